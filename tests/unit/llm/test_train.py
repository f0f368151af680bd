"""train_llm in process on a tiny random LlamaForCausalLM with a tokenizer made locally (CPU, offline)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_diffusion.llm import main as train_main
from bilora_diffusion.llm.data import (
    IGNORE,
    PromptFormat,
    collate,
    pack,
    prompt_ids,
    read_rows,
    tokenize_rows,
)
from bilora_diffusion.llm.evaluate import main as evaluate_main
from bilora_diffusion.llm.options import LLMOptions
from bilora_diffusion.llm.train import train
from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[3]
SUMS = [(2, 3), (4, 5), (10, 7), (1, 1)]


def plain_rows() -> list[dict]:
    return [
        {"prompt": f"what is {a} plus {b} ?", "response": f"{a} plus {b} gives {a + b} #### {a + b}"}
        for a, b in SUMS
    ]


def chat_rows() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in plain_rows()
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm-data")
    return {
        "plain": write_jsonl(root / "sums.jsonl", plain_rows()),
        "chat": write_jsonl(root / "chat.jsonl", chat_rows()),
    }


def options(model, data, out, *extra, **kw) -> LLMOptions:
    argv = [
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--train_batch_size",
        "4",
    ]
    argv += ["--learning_rate", "1e-2", "--adam_weight_decay", "0", "--report_to", "none", *extra]
    for key, value in kw.items():
        argv += [f"--{key}", str(value)]
    return parse_options(LLMOptions, argv)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


# -- data -----------------------------------------------------------------------------------------------------
def test_prompt_tokens_have_label_minus_100_plain_and_chat():
    tok = tiny_tokenizer()
    fmt = PromptFormat(template="question : {prompt}\n")
    row = {"prompt": "what is 2 plus 3 ?", "response": "5 #### 5"}
    (example,), _ = tokenize_rows([row], tok, fmt, max_length=64)
    prompt = ids(tok, "<s> question : what is 2 plus 3 ?")
    response = ids(tok, "5 #### 5 </s>")
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE] * len(prompt) + response
    assert prompt_ids(row, fmt, tok) == prompt  # the evaluator generates from exactly the untrained head

    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello you"},
            {"role": "user", "content": "how many cats ?"},
            {"role": "assistant", "content": "2 cats"},
        ]
    }
    (example,), _ = tokenize_rows([chat], tok, PromptFormat(system_prompt="be good"), max_length=64)
    expected = [
        ("<s> <|system|> be good <|user|> hi <|assistant|>", False),
        ("hello you </s>", True),
        ("<|user|> how many cats ? <|assistant|>", False),
        ("2 cats </s>", True),
    ]
    want_ids = [i for text, _ in expected for i in ids(tok, text)]
    want_labels = [i if trained else IGNORE for text, trained in expected for i in ids(tok, text)]
    assert example.input_ids == want_ids and example.labels == want_labels
    head = prompt_ids({"messages": chat["messages"][:3]}, PromptFormat(system_prompt="be good"), tok)
    assert head == want_ids[: len(head)] and tok.convert_ids_to_tokens(head[-1]) == "<|assistant|>"

    # --use_chat_template: a prompt/response row becomes a user turn and an assistant turn.
    (as_chat,), _ = tokenize_rows([row], tok, PromptFormat(use_chat_template=True), max_length=64)
    turn = ids(tok, "<s> <|user|> what is 2 plus 3 ? <|assistant|>")
    assert as_chat.labels == [IGNORE] * len(turn) + ids(tok, "5 #### 5 </s>")


def test_truncation_is_counted_and_bad_rows_reported():
    tok = tiny_tokenizer()
    rows = [
        *plain_rows(),
        {"prompt": "what is 1 plus 1 plus 1 plus 1 plus 1 ?", "response": "5"},
        {"prompt": "hi"},
    ]
    examples, report = tokenize_rows(rows, tok, PromptFormat(), max_length=9)
    # Rows 0-3 (15 tokens) are cut to 9 and keep response tokens; row 4's response is past the cut: dropped.
    assert report.rows == 6 and report.examples == 4 and report.truncated == 5 and report.dropped == 1
    assert len(report.bad_rows) == 1 and "'response'" in report.bad_rows[0]
    assert all(len(e.input_ids) == 9 for e in examples) and report.longest == 15
    assert "5 truncated to --max_length 9" in report.summary(9)


def test_a_tokenizer_without_chat_template_stops_chat_data():
    from bilora_diffusion.llm.data import TemplateError

    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError, match="chat template"):
        tokenize_rows(chat_rows(), tok, PromptFormat(), max_length=64)


def test_readers_jsonl_json_csv_agree_and_name_bad_lines(tmp_path):
    rows = plain_rows()
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text(
        "prompt,response\n" + "".join(f'"{r["prompt"]}","{r["response"]}"\n' for r in rows)
    )
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    for name in ("d.json", "d.csv"):
        assert read_rows(str(tmp_path / name)) == rows
    assert read_rows(str(jsonl), limit=2) == rows[:2]
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        read_rows(str(tmp_path / "bad.jsonl"))


def test_packed_loss_equals_the_loss_of_each_example_alone(llm_dir):
    """Packing with position ids restarting per example keeps attention inside each example."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    examples, _ = tokenize_rows(plain_rows(), tok, PromptFormat(), max_length=64)
    packs = pack(examples, max_length=32)
    assert len(packs) == 2 and packs[0].key == "row 0+1" and packs[0].position_ids[15] == 0

    def summed(batch):
        with torch.no_grad():
            loss = model(**batch.model_inputs("cpu"), use_cache=False).loss
        return float(loss) * batch.trained_tokens, batch.trained_tokens

    alone = [summed(collate([e], tok.pad_token_id)) for e in examples]
    packed = summed(collate(packs, tok.pad_token_id))
    # Each example's first label follows the previous example's last token in the pack: one more token each.
    first_labels = sum(e.labels[0] != IGNORE for e in examples)
    assert packed[1] == sum(n for _, n in alone) + first_labels - sum(p.labels[0] != IGNORE for p in packs)
    assert packed[0] / packed[1] == pytest.approx(
        sum(s for s, _ in alone) / sum(n for _, n in alone), rel=1e-4
    )


# -- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,fmt,extra",
    [
        ("lora", "plain", ["--packing", "--max_length", "32"]),
        ("bilora", "chat", []),
        ("dual-descent", "plain", ["--gradient_checkpointing"]),
        ("lora-sam", "chat", []),
        ("flat-lora", "plain", ["--lr_scheduler", "cosine", "--lr_warmup_ratio", "0.2"]),
    ],
)
def test_every_method_lowers_the_training_loss(llm_dir, data_files, tmp_path, method, fmt, extra):
    out = tmp_path / "out"
    result = train(options(llm_dir, data_files[fmt], out, *extra, method=method, max_train_steps=6))
    assert result.global_step == 6 and result.skipped_steps == 0
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    state = load_file(str(out / "bilora_adapters.safetensors"))
    assert any("bilora_aux" in k for k in state) == (method in ("bilora", "dual-descent"))
    assert (out / "adapter_config.json").is_file() and (out / "training_config.yaml").is_file()


@pytest.fixture(scope="module")
def bilora_run(llm_dir, data_files, tmp_path_factory):
    """One Bi-LoRA run that memorises the sums set, with held-out loss and --merge."""
    out = tmp_path_factory.mktemp("bilora-run") / "out"
    opts = options(
        llm_dir,
        data_files["plain"],
        out,
        "--merge",
        eval_dataset=data_files["plain"],
        max_train_steps=12,
        validation_steps=6,
        learning_rate=2e-2,
        rho=0.5,
    )
    return out, train(opts)


def test_exported_adapter_is_the_primary_branch_and_loads_with_peft(llm_dir, bilora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bilora_diffusion import attach_bilora, aux_disabled
    from bilora_diffusion.state import load_bilora_state, read_bilora_state

    out, _ = bilora_run
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and not any("bilora_aux" in k for k in weights)
    assert all(k.startswith("base_model.model.model.layers.") for k in weights)
    assert len(weights) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["task_type"] == "CAUSAL_LM"

    _, configs, _ = read_bilora_state(out / "bilora_adapters.safetensors")
    trained = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    attach_bilora(trained, configs["model"])
    load_bilora_state(out / "bilora_adapters.safetensors", {"model": trained})
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), out).eval()
    x = torch.tensor([[1, 7, 8, 70, 9, 71, 21]])
    with torch.no_grad():
        with_aux = trained(x).logits
        with aux_disabled(trained):
            primary = trained(x).logits
        loaded = peft_model(x).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(x).logits
    assert not torch.allclose(with_aux, primary, atol=1e-4)  # the auxiliary branch is there, and left out
    torch.testing.assert_close(loaded, primary, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, primary, atol=1e-4, rtol=1e-4)


def test_use_dora_trains_an_llm_and_exports_a_peft_dora_adapter(llm_dir, data_files, tmp_path):
    """--use_dora (a core field, so the LLM trainer has it too): the PEFT adapter folder is DoRA and gives the
    trained model's primary branch exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bilora_diffusion import attach_bilora, aux_disabled
    from bilora_diffusion.state import load_bilora_state, read_bilora_state

    out = tmp_path / "out"
    train(options(llm_dir, data_files["plain"], out, "--use_dora", max_train_steps=3))
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(out / "adapter_model.safetensors")))
    _, configs, _ = read_bilora_state(out / "bilora_adapters.safetensors")
    assert configs["model"].use_dora and configs["model"].aux_rank == 8
    trained = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    attach_bilora(trained, configs["model"])
    load_bilora_state(out / "bilora_adapters.safetensors", {"model": trained})
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), out).eval()
    x = torch.tensor([[1, 7, 8, 70, 9, 71, 21]])
    with torch.no_grad(), aux_disabled(trained):
        torch.testing.assert_close(loaded(x).logits, trained(x).logits, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(loaded(x).logits, base(x).logits, atol=1e-4)  # it trained


def test_held_out_loss_is_measured_on_the_primary_branch(llm_dir, bilora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, result = bilora_run
    assert [step for step, _ in result.val_losses] == [6, 12]
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    tok = tiny_tokenizer()
    examples, _ = tokenize_rows(plain_rows(), tok, PromptFormat(), max_length=1024)
    batch = collate(examples, tok.pad_token_id)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), out).eval()
    with torch.no_grad():
        loss = float(model(**batch.model_inputs("cpu")).loss)
    assert result.val_losses[-1][1] == pytest.approx(loss, rel=1e-4)


def test_resume_equals_an_uninterrupted_run(llm_dir, tmp_path):
    rows = [{"prompt": f"what is {a} plus {a} ?", "response": f"{2 * a}"} for a in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_train_steps", "5"]
    common += ["--checkpointing_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    full = train(options(llm_dir, data, tmp_path / "a", *common, learning_rate=5e-3))
    # 3 steps per epoch: checkpoint-2 is mid-epoch, and the rest crosses into epoch 1.
    resumed = train(
        options(
            llm_dir,
            data,
            tmp_path / "b",
            *common,
            learning_rate=5e-3,
            resume_from_checkpoint=tmp_path / "a" / "checkpoint-2",
        )
    )
    assert resumed.losses == full.losses[2:]
    a = load_file(str(tmp_path / "a" / "bilora_adapters.safetensors"))
    b = load_file(str(tmp_path / "b" / "bilora_adapters.safetensors"))
    assert a.keys() == b.keys() and any("bilora_aux" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- evaluation -----------------------------------------------------------------------------------------------


def test_batched_generation_equals_one_prompt_at_a_time(llm_dir):
    """Left padding and its attention mask leave every greedy completion as it is alone."""
    from transformers import AutoModelForCausalLM

    from bilora_diffusion.llm.evaluate import generate

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    prompts = [tok(text)["input_ids"] for text in ("hi", "what is 2 plus 3 ?", "how many cats are there ?")]
    together = generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert together == alone and all(together)


@pytest.mark.parametrize(
    "extra,key",
    [
        (["--max_length", "32"], "max_length"),
        (["--packing"], "packing"),
        (["--prompt_template", "Q: {prompt}\n"], "prompt_template"),
        (["--max_train_samples", "2"], "max_train_samples"),
        (["--lora_alpha", "8"], "alpha"),
        (["--target_modules", "q_proj", "v_proj"], "target_modules"),
        (["--rank", "4"], "rank"),
    ],
)
def test_resume_refuses_a_checkpoint_of_other_data_or_adapters(llm_dir, data_files, identity_run, extra, key):
    """Everything trainer_state.json saves is compared: a resume with other data, tokens or adapters stops with
    one line naming the field, before any model loads."""
    out, argv = identity_run
    with pytest.raises(OptionError, match=f"it was made with {key}=.*this run has {key}=") as err:
        train(options(llm_dir, data_files["plain"], out, *argv, *extra))
    assert "\n" not in str(err.value)


def test_resume_refuses_a_checkpoint_of_another_dataset(llm_dir, data_files, identity_run):
    out, argv = identity_run
    with pytest.raises(OptionError, match=f"it was made with dataset='{data_files['plain']}'"):
        train(options(llm_dir, data_files["chat"], out, *argv))


@pytest.fixture(scope="module")
def identity_run(llm_dir, data_files, tmp_path_factory):
    """A 2-step run with a checkpoint after step 1, and the flags that resume it."""
    out = tmp_path_factory.mktemp("identity") / "out"
    argv = ["--max_train_steps", "2", "--checkpointing_steps", "1"]
    train(options(llm_dir, data_files["plain"], out, *argv))
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["dataset"] == str(data_files["plain"]) and state["max_length"] == 1024
    assert state["packing"] is False and state["alpha"] == 16.0 and state["rank"] == 8
    # The same options resume (nothing is left to do but the last step).
    assert (
        train(
            options(llm_dir, data_files["plain"], out, *argv, "--resume_from_checkpoint", "latest")
        ).global_step
        == 2
    )
    return out, [*argv, "--resume_from_checkpoint", str(out / "checkpoint-1")]


def test_evaluator_command_scores_the_memorised_set(bilora_run, data_files, tmp_path):
    out, _ = bilora_run
    predictions = tmp_path / "pred.jsonl"
    summary = evaluate_main(
        ["--adapter", str(out), "--data", str(data_files["plain"]), "--prompt_field", "prompt"]
        + ["--response_field", "response", "--max_new_tokens", "12", "--output", str(predictions)]
    )
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert summary["total"] == 4 and summary["correct"] == sum(r["correct"] for r in records)
    assert summary["accuracy"] == 1.0, records  # 12 steps memorise the four sums


# -- options --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,name",
    [
        (["--max_length", "1"], "--max_length"),
        (["--method", "sam"], "--method"),
        (["--prompt_template", "{prompt"], "--prompt_template"),
        (["--lr_warmup_ratio", "1.5"], "--lr_warmup_ratio"),
        (["--packing", "maybe"], "--packing"),
        (["--init_lora_weights", "pissa"], "--init_lora_weights"),
        (["--max_lenght", "8"], "did you mean 'max_length'"),
        (["--dataset", "missing.jsonl"], "missing.jsonl"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    ],
)
def test_bad_options_exit_2_naming_the_option(llm_dir, data_files, tmp_path, capsys, argv, name):
    base = [
        "--model",
        str(llm_dir),
        "--dataset",
        str(data_files["plain"]),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as exc:
        train_main(base + argv)
    assert exc.value.code == 2 and name in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model_and_evaluator_options_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--dataset", "x.jsonl"])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--adapter", str(tmp_path), "--data", "x.jsonl"])
    assert exc.value.code == 2 and "--adapter" in capsys.readouterr().err


def test_llm_configs_parse():
    # The paper's presets (llm_demo.yaml, the offline demo, has its own test in test_llm_demo.py).
    files = sorted(p for p in (ROOT / "configs").glob("llm_*.yaml") if p.name != "llm_demo.yaml")
    assert len(files) >= 2
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# accelerate launch train_llm.py --config configs/{path.name}"), path
        opts = parse_options(LLMOptions, ["--config", str(path)])
        assert opts.method == "bilora" and opts.rho == 0.05 and opts.rank == 8
        assert opts.target_modules == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
