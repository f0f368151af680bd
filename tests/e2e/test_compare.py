"""bilora-compare end to end on a tiny SDXL and a tiny random CLIP: equal batches, a report that matches the runs, resume."""

import json
import math

import pytest

from bilora_diffusion import compare
from bilora_diffusion.testing import make_image_folder


@pytest.mark.slow
def test_compare_end_to_end_equal_batches_report_matches_runs_and_resumes(
    tiny_sdxl_dir, tiny_clip_dir, tmp_path
):
    data = make_image_folder(tmp_path / "data", n=10)
    out = tmp_path / "compare"
    argv = ["--methods", "lora,bilora", "--seeds", "2", "--validation_split", "0.2"]
    argv += ["--validation_clip_model", tiny_clip_dir, "--output_dir", str(out), "--record_batches"]
    argv += ["--radii", "0.5", "--sharpness_directions", "1"]
    trainer = ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset", str(data), "--resolution", "64"]
    trainer += [
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--rho",
        "0.5",
    ]
    trainer += ["--report_to", "none", "--validation_prompt", "a red square", "--num_validation_images", "2"]
    trainer += [
        "--validation_inference_steps",
        "2",
        "--compare_grid",
        "false",
        "--export_format",
        "diffusers",
        "--checkpointing_steps",
        "1",
    ]

    # seed 1 is "done" already (a killed compare): its markers are kept and those runs are not trained
    settings = compare.settings_from(*compare.parse_args(argv + trainer))
    for label, loss in (("lora", 0.5), ("bilora", 0.6)):
        done = out / "runs" / f"{label}-s1"
        done.mkdir(parents=True)
        fake = {"label": label, "method": label, "seed": 1, "metrics": {"heldout_loss": loss, "wall_s": 1.0}}
        fake["identity"] = compare.run_identity(settings, compare.parse_variants([label])[0], 1)
        (done / compare.MARKER).write_text(json.dumps(fake))
    report = compare.main(argv + trainer)

    assert not (done / "training_config.yaml").exists()  # skipped, not retrained
    runs = {(r["label"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {("lora", 0), ("bilora", 0), ("lora", 1), ("bilora", 1)} and not report["missing"]

    # identical batches and noise, step by step, for both methods at the same seed
    def digests(label, seed):
        lines = (out / "runs" / f"{label}-s{seed}" / "batch_hashes.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    assert digests("lora", 0) == digests("bilora", 0) and len(digests("lora", 0)) == 2
    assert len({d for step in digests("lora", 0) for d in step["digests"]}) == 2  # two different batches

    # the report's numbers are the runs' own: held-out loss, CLIP scores (samples/scores.json), sharpness
    for label in ("lora", "bilora"):
        run = runs[(label, 0)]
        scores = json.loads((out / "runs" / f"{label}-s0" / "samples" / "scores.json").read_text())
        assert [e["step"] for e in scores] == [0, 2]  # step 0 (base) and the final samples
        assert run["metrics"]["clip_i2t"] == scores[-1]["clip_i2t"]
        assert run["metrics"]["clip_i2i"] == scores[-1]["clip_i2i"]
        assert 0 <= scores[-1]["clip_i2t"] <= 100
        assert run["metrics"]["heldout_loss"] == run["val_losses"][-1][1] and math.isfinite(
            run["heldout_loss"]
        )
        assert run["metrics"]["sharp_0.5"] == run["sharpness"]["mean"]["0.5"]
        assert run["peak_memory_mb"] > 0 and run["wall_s"] > 0
    assert (
        scores[0]["clip_i2t"]
        == json.loads((out / "runs" / "lora-s0" / "samples" / "scores.json").read_text())[0]["clip_i2t"]
    )  # step 0 samples are the base model's: the same for both methods
    lora = report["summary"]["lora"]["heldout_loss"]
    assert lora[0] == pytest.approx((runs[("lora", 0)]["heldout_loss"] + 0.5) / 2) and lora[2] == 2
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "bilora vs lora" in md
    assert (out / "report.png").is_file() and json.loads((out / "report.json").read_text())["summary"]

    # a run killed after its checkpoint (no marker yet) resumes from it instead of starting over
    (out / "runs" / "lora-s0" / compare.MARKER).unlink()
    resumed = {(r["label"], r["seed"]): r for r in compare.main(argv + trainer)["runs"]}
    assert resumed[("lora", 0)]["resumed_at_step"] == 1 and resumed[("lora", 0)]["steps"] == 2
    assert resumed[("bilora", 0)]["wall_s"] == runs[("bilora", 0)]["wall_s"]  # finished: not run again
    assert resumed[("lora", 0)]["heldout_loss"] == pytest.approx(runs[("lora", 0)]["heldout_loss"], abs=1e-6)

    # gathering again changes nothing; a changed run (another --max_train_steps) is not taken as done
    again = compare.main(argv + trainer + ["--report_only"])
    assert again["runs"] == compare.gather(settings)[0] and not again["missing"]
    changed = compare.settings_from(*compare.parse_args(argv + trainer + ["--max_train_steps", "3"]))
    assert compare.marker_of(changed, settings.variants[0], 0) is None
    assert compare.marker_of(settings, settings.variants[0], 0)["seed"] == 0
