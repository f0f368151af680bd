"""--optimizer: the auxiliary branch ascends (and the primary descends) with every inner optimizer, state
survives a checkpoint, bad values and missing packages fail in one line."""

import importlib.util
import io

import pytest
import torch
from torch import nn

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora
from bilora_diffusion.options import OptionError, TrainOptions, parse_options
from bilora_diffusion.peft_glue import branch_pairs
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.training import make_optimizer, optimizer_choice


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available(name: str) -> bool:
    if name == "adamw8bit":  # bitsandbytes' 8-bit states live on a CUDA GPU
        return installed("bitsandbytes") and torch.cuda.is_available()
    return {"prodigy": installed("prodigyopt"), "lion": installed("lion_pytorch")}.get(name, True)


OPTIMIZERS = ["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "sgd"]
RUNNABLE = [name for name in OPTIMIZERS if available(name)]
"""The optimizers this machine can step (8-bit AdamW needs bitsandbytes and a CUDA GPU; the test extra installs
prodigyopt and lion-pytorch): the per-optimizer tests are generated for these, so none is skipped."""
# A learning rate each optimizer takes steps of a visible size with (Prodigy's is a multiplier of its d).
LR = {"prodigy": 1.0, "lion": 1e-3, "adafactor": 1e-2}


def run_options(tmp_path, name: str, method: str = "bilora", *extra: str) -> TrainOptions:
    argv = ["--optimizer", name, "--method", method, "--output_dir", str(tmp_path / "out")]
    argv += ["--learning_rate", str(LR.get(name, 1e-2)), "--adam_weight_decay", "0", *extra]
    return parse_options(TrainOptions, argv)


def twin_model(device: str = "cpu") -> tuple[nn.Module, BiLoRAConfig, list, list]:
    """Two linear layers with both branches of equal shape and scale; every auxiliary tensor starts equal to
    its primary twin, so the two branches see the same problem from the same point."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    config = BiLoRAConfig(rank=2, alpha=2.0, aux_rank=2, aux_alpha=2.0, rho=1e6, target_modules=["0", "2"])
    attach_bilora(model, config)
    model.to(device)
    primary, aux = branch_pairs([model], PRIMARY), branch_pairs([model], AUX)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p, a in zip(primary, aux):
            for tp, ta in ((p.A_param, a.A_param), (p.B_param, a.B_param)):
                tp.copy_(torch.randn(tp.shape, generator=gen) * 0.3)
                ta.copy_(tp)
    return model, config, primary, aux


def tensors(pairs) -> list[torch.Tensor]:
    return [t for pair in pairs for t in (pair.A_param, pair.B_param)]


def set_grads(primary, aux, step: int) -> list[torch.Tensor]:
    """The same hand-made gradient on each primary tensor and its auxiliary twin (a new one every step)."""
    gen = torch.Generator().manual_seed(100 + step)
    grads = []
    for tp, ta in zip(tensors(primary), tensors(aux)):
        g = torch.randn(tp.shape, generator=gen).to(tp.device)
        tp.grad, ta.grad = g.clone(), g.clone()
        grads.append(g)
    return grads


def build(options, model, config):
    return make_optimizer(options, [(model, options.learning_rate)], config, total_steps=10, world_size=1)


@pytest.mark.parametrize("method", ["bilora", "dual-descent"])
@pytest.mark.parametrize("name", RUNNABLE)
def test_aux_step_sign_and_mirror_per_optimizer(tmp_path, name, method):
    """First step: the primary moves along -grad elementwise; the auxiliary along +grad under bilora (ascent)
    and along -grad under dual-descent. Every step (state, momentum, Prodigy's shared d included): fed the same
    gradients from the same point, the auxiliary step is exactly minus (bilora) or exactly (dual-descent) the
    primary step, which is what ascending with the same optimizer means for these optimizers (each is odd in
    the gradients it is fed: Lion's sign, Adam's and Adafactor's g/sqrt(v), Prodigy's d estimate from
    g·(x0 - x) all flip with the gradient)."""
    device = "cuda" if name == "adamw8bit" else "cpu"
    model, config, primary, aux = twin_model(device)
    options = run_options(tmp_path, name, method, "--max_grad_norm", "0")
    optimizer = build(options, model, config)
    sign = 1.0 if method == "bilora" else -1.0
    for step in range(3):
        before_p = [t.detach().clone() for t in tensors(primary)]
        before_a = [t.detach().clone() for t in tensors(aux)]
        grads = set_grads(primary, aux, step)
        optimizer.step()
        optimizer.zero_grad()
        for g, bp, ba, tp, ta in zip(grads, before_p, before_a, tensors(primary), tensors(aux)):
            dp, da = tp.detach() - bp, ta.detach() - ba
            assert dp.abs().max() > 0, (name, step)
            if step == 0:
                nz = g != 0
                assert torch.equal(torch.sign(dp[nz]), -torch.sign(g[nz])), (name, "primary descends")
                assert torch.equal(torch.sign(da[nz]), sign * torch.sign(g[nz])), (name, method)
            torch.testing.assert_close(da, -sign * dp, rtol=1e-4, atol=1e-7 * (1 + float(dp.abs().max())))


@pytest.mark.parametrize("name", RUNNABLE)
def test_optimizer_state_survives_a_checkpoint(tmp_path, name):
    """Two steps, the state through torch.save / torch.load(weights_only=True) (as checkpoints do) into a
    fresh optimizer, then one more step on both: the same tensors, bit for bit."""
    device = "cuda" if name == "adamw8bit" else "cpu"
    options = run_options(tmp_path, name, "bilora", "--adam_weight_decay", "0.01")
    model, config, primary, aux = twin_model(device)
    optimizer = build(options, model, config)
    for step in range(2):
        set_grads(primary, aux, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2, _, primary2, aux2 = twin_model(device)
    with torch.no_grad():
        for t, t2 in zip(tensors(primary + aux), tensors(primary2 + aux2)):
            t2.copy_(t)
    resumed = build(options, model2, config)
    resumed.load_state_dict(state)
    set_grads(primary, aux, 2)
    set_grads(primary2, aux2, 2)
    optimizer.step()
    resumed.step()
    for t, t2 in zip(tensors(primary + aux), tensors(primary2 + aux2)):
        assert torch.equal(t, t2), name


def test_optimizer_names_and_options(tmp_path):
    def parse(*argv):
        return parse_options(TrainOptions, ["--output_dir", str(tmp_path), *argv])

    assert parse().optimizer_name == "adamw"
    assert parse("--optimizer", "AdamW").optimizer == "adamw"  # diffusers' spelling
    assert TrainOptions(use_8bit_adam=True).optimizer_name == "adamw8bit"  # parsed: needs bitsandbytes
    cls, kwargs = optimizer_choice(parse("--optimizer", "sgd", "--sgd_momentum", "0.9"))
    assert cls is torch.optim.SGD and kwargs["momentum"] == 0.9
    cls, kwargs = optimizer_choice(parse("--optimizer", "adafactor"))
    assert kwargs["relative_step"] is False and kwargs["scale_parameter"] is False
    if installed("lion_pytorch"):
        assert optimizer_choice(parse("--optimizer", "lion"))[1]["betas"] == (0.9, 0.99)
    if installed("prodigyopt"):
        argv = ("--optimizer", "prodigy", "--prodigy_d_coef", "2", "--prodigy_safeguard_warmup", "false")
        kwargs = optimizer_choice(parse(*argv, "--adam_beta2", "0.99"))[1]
        assert kwargs["d_coef"] == 2.0 and kwargs["safeguard_warmup"] is False
        assert kwargs["use_bias_correction"] is True and kwargs["betas"] == (0.9, 0.99)
    bad = [
        (("--optimizer", "adam"), "--optimizer: must be one of"),
        (("--optimizer", "lion", "--use_8bit_adam"), "--use_8bit_adam"),
        (("--adam_beta2", "1.0"), "--adam_beta2"),
        (("--adam_epsilon", "0"), "--adam_epsilon"),
        (("--adam_weight_decay", "-1"), "--adam_weight_decay"),
        (("--sgd_momentum", "-0.1"), "--sgd_momentum"),
        (("--prodigy_d_coef", "0"), "--prodigy_d_coef"),
        (("--prodigy_beta3", "2"), "--prodigy_beta3"),
    ]
    if installed("prodigyopt"):
        bad.append((("--optimizer", "prodigy", "--learning_rate", "1", "--aux_lr", "0.5"), "--aux_lr"))
    for argv, message in bad:
        with pytest.raises(OptionError, match=message):
            parse(*argv)
    if installed("prodigyopt"):
        data = ["--dataset", ".", "--output_dir", str(tmp_path), "--optimizer", "prodigy"]
        with pytest.raises(OptionError, match="--text_encoder_lr"):
            parse_options(SDXLOptions, [*data, "--text_encoder_lr", "0.5"])


@pytest.mark.parametrize(
    "name, module, extra",
    [
        ("prodigy", "prodigyopt", "prodigy"),
        ("lion", "lion_pytorch", "lion"),
        ("adamw8bit", "bitsandbytes", "bnb"),
    ],
)
def test_missing_optimizer_package_fails_in_one_line(tmp_path, monkeypatch, name, module, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(
        OptionError, match=rf"--optimizer {name} needs .*pip install 'bilora-diffusion\[{extra}\]'"
    ):
        parse_options(TrainOptions, ["--output_dir", str(tmp_path), "--optimizer", name])


def test_resuming_a_checkpoint_of_another_optimizer_is_refused(tmp_path):
    from bilora_diffusion.checkpoint import CheckpointError, check_compatible
    from bilora_diffusion.sdxl.train import SDXLTrainer

    options = parse_options(
        SDXLOptions, ["--dataset", ".", "--output_dir", str(tmp_path), "--optimizer", "sgd"]
    )
    identity = SDXLTrainer.checkpoint_identity(options)
    assert identity["optimizer"] == "sgd"
    with pytest.raises(CheckpointError, match="optimizer='adamw', this run has optimizer='sgd'"):
        check_compatible({**identity, "optimizer": "adamw"}, identity, "checkpoint-2")
    older = {k: v for k, v in identity.items() if k != "optimizer"}  # checkpoints from before --optimizer
    check_compatible(older, identity, "checkpoint-2")
