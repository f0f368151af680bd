"""Pretrain the tiny causal LM of the offline LLM demo and write the demo's task data, reproducibly, on a CPU.

    python scripts/pretrain_llm_demo.py --seed 0      # about 2 minutes on 2 cores; writes bilora_diffusion/llm/demo

The model (`bilora_diffusion/llm/demo/tiny-sums`) is a 2-layer LlamaForCausalLM of width 64 with the word-level
tokenizer of `bilora_diffusion.testing` (every word and every number is one token), pretrained as a plain
language model on two kinds of text:

- lines of arithmetic facts: ``3 plus 4 is 7 . 9 minus 2 is 7 . ...`` (every sum of two numbers up to 19 and
  every difference of them), so it knows how to subtract;
- word problems that add, answered GSM8K-style:
  ``tom has 3 apples and ann has 4 apples . how many apples are there in total ? 3 plus 4 is 7 #### 7``.

It has never seen a problem that subtracts. The demo's task (`bilora_diffusion/llm/demo/{train,test}.jsonl`,
columns ``question`` / ``answer``) is exactly that:

    question: tom has 7 apples and ann has 3 apples . how many more apples does tom have than ann ?
    answer:   7 minus 3 is 4 #### 4

The base model answers them as sums (``7 plus 3 is 10 #### 10``: 0 % right); a LoRA fine-tune on the training
problems teaches it to subtract. The held-out problems (test.jsonl) use number pairs that no training problem
uses, so they measure the skill, not memorised answers.

Pretraining stops when the model gets every fact and every addition problem right (greedy, teacher forced),
then writes the model (float32 safetensors, < 1 MB), the tokenizer, a model card with the measured numbers
and the task data.

Caveat: how well the demo's LoRA does depends on the pretraining run, not only on the LoRA. The shipped model
(one run of this script, 500 steps) scores 95-100 % after the demo's LoRA over LoRA seeds 0-3; a later run of
the same command, on the same machine with the package's core changed in between, gave a different model
(bitwise; two runs started together agree) on which the same LoRA scored 35-62 %, and pretraining that kept
every pair of numbers in the problems for at least 1500 steps did no better (18-60 %). The task data is the
same in every run. Treat this script as how the model was made, not as a guarantee of the demo's number.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from bilora_diffusion.testing import tiny_llama, tiny_tokenizer

DEMO_DIR = Path(__file__).resolve().parent.parent / "bilora_diffusion" / "llm" / "demo"
LARGEST = 19
"""Every number in the world is 0..LARGEST: sums a + b <= LARGEST, differences of those."""
NAMES = ["tom", "ann", "bob"]
EXTRA_WORDS = ("does", "have", "than")
"""Words of the subtraction problems that the test tokenizer of `bilora_diffusion.testing` lacks."""
THINGS = ["apples", "pears", "cats", "dogs"]


def pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(LARGEST + 1) for b in range(LARGEST + 1 - a)]


def facts() -> list[tuple[int, str, int, int]]:
    """(a, op, b, result): every a plus b, and every (a + b) minus b."""
    return [(a, "plus", b, a + b) for a, b in pairs()] + [(a + b, "minus", b, a) for a, b in pairs()]


def fact_text(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} is {c} ."


def problem(a: int, op: str, b: int, c: int, rng: random.Random) -> dict:
    """A word problem for a fact, with the GSM8K-style answer: the fact written out, then '#### result'."""
    first, second = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    if op == "plus":
        question = (
            f"{first} has {a} {thing} and {second} has {b} {thing} . how many {thing} are there in total ?"
        )
    else:
        question = (
            f"{first} has {a} {thing} and {second} has {b} {thing} . "
            f"how many more {thing} does {first} have than {second} ?"
        )
    return {"question": question, "answer": f"{a} {op} {b} is {c} #### {c}"}


def demo_problems(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Subtraction problems (the skill the base model lacks) on disjoint number pairs for training and test;
    none subtracts 0 (the base model's sum would be right)."""
    rng = random.Random(seed)
    pool = [f for f in facts() if f[1] == "minus" and f[2] > 0]  # c minus 0 = c plus 0: no change to see
    rng.shuffle(pool)
    test = [problem(*f, rng) for f in pool[:n_test]]
    train = [problem(*f, rng) for f in pool[n_test : n_test + n_train]]
    return train, test


def tokens(tokenizer, text: str, eos: bool) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def pretraining_batch(tokenizer, rng: random.Random, size: int, per_line: int) -> tuple[torch.Tensor, ...]:
    """Half lines of facts, half addition word problems (question, answer, EOS), padded; all tokens trained."""
    sums = [f for f in facts() if f[1] == "plus"]
    rows = []
    for k in range(size):
        if k % 2:
            row = problem(*rng.choice(sums), rng)
            rows.append(tokens(tokenizer, f"{row['question']} {row['answer']}", eos=True))
        else:
            rows.append(
                tokens(tokenizer, " ".join(fact_text(*rng.choice(facts())) for _ in range(per_line)), False)
            )
    width = max(map(len, rows))
    ids = torch.full((size, width), tokenizer.pad_token_id)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = labels[k, : len(row)] = torch.tensor(row)
        mask[k, : len(row)] = 1
    return ids, labels, mask


@torch.no_grad()
def fact_accuracy(model, tokenizer) -> float:
    """Share of facts whose result is the greedy next token after 'a op b is' (one batched forward)."""
    items = facts()
    ids = torch.tensor([tokenizer(f"{a} {op} {b} is")["input_ids"] for a, op, b, _ in items])
    logits = model(input_ids=ids).logits[:, -1]
    want = torch.tensor(tokenizer.convert_tokens_to_ids([str(c) for *_, c in items]))
    return float((logits.argmax(-1) == want).float().mean())


@torch.no_grad()
def problem_accuracy(model, tokenizer, op: str) -> float:
    """Share of word problems (one per fact of ``op``) whose whole answer is the greedy continuation, teacher
    forced (one batched forward; all problems of one kind have the same number of tokens)."""
    rng = random.Random(0)
    rows = [problem(*fact, rng) for fact in facts() if fact[1] == op]
    start = len(tokens(tokenizer, rows[0]["question"], False))
    full = torch.tensor([tokens(tokenizer, f"{r['question']} {r['answer']}", True) for r in rows])
    predicted = model(input_ids=full).logits[:, start - 1 : -1].argmax(-1)
    return float((predicted == full[:, start:]).all(-1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(DEMO_DIR))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6000, help="most pretraining steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per_line", type=int, default=8, help="facts per training sequence")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--n_train", type=int, default=64)
    parser.add_argument("--n_test", type=int, default=40)
    parser.add_argument(
        "--threads", type=int, default=1, help="1 is fastest for a model this small (and on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    tokenizer = tiny_tokenizer(EXTRA_WORDS)
    model = tiny_llama(len(tokenizer), args.seed, args.hidden, args.layers, initializer_range=0.02)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    rng = random.Random(args.seed)
    start, accuracy, adds, step = time.time(), 0.0, 0.0, 0
    for step in range(1, args.steps + 1):
        ids, labels, mask = pretraining_batch(tokenizer, rng, args.batch, args.per_line)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0:
            model.eval()
            accuracy = fact_accuracy(model, tokenizer)
            adds = problem_accuracy(model, tokenizer, "plus")
            model.train()
            print(
                f"step {step}: loss {loss.item():.4f}, facts {accuracy:.1%}, addition problems {adds:.1%}, "
                f"{time.time() - start:.0f} s",
                flush=True,
            )
            if accuracy == 1.0 and adds == 1.0:
                break
    model.eval()
    subtracts = problem_accuracy(model, tokenizer, "minus")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "tiny-sums"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, test = demo_problems(args.seed, args.n_train, args.n_test)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = sum(p.numel() for p in model.parameters())
    (model_dir / "README.md").write_text(
        f"# tiny-sums\n\nA {args.layers}-layer LlamaForCausalLM of width {args.hidden} ({params:,} parameters, "
        "float32) with a word-level tokenizer, made by `python scripts/pretrain_llm_demo.py "
        f"--seed {args.seed}` for the offline LLM demo of bilora-diffusion (`accelerate launch train_llm.py`).\n\n"
        f"Pretrained as a plain language model for {step} steps of {args.batch} sequences on lines of facts "
        f"(`3 plus 4 is 7 . 9 minus 2 is 7 .`: every sum of two numbers up to {LARGEST} and every difference "
        "of them) and on word problems that add, answered GSM8K-style "
        "(`tom has 3 apples and ann has 4 apples . how many apples are there in total ? 3 plus 4 is 7 #### 7`). "
        "It has never seen a problem that subtracts "
        "(`tom has 7 apples and ann has 3 apples . how many more apples does tom have than ann ?`).\n\n"
        f"Measured at the end (greedy, teacher-forced): {accuracy:.0%} of the facts, {adds:.0%} of the addition "
        f"problems and {subtracts:.0%} of the subtraction problems right.\n"
    )
    print(
        f"wrote {model_dir} ({params:,} parameters), {len(train)} training and {len(test)} held-out problems"
    )


if __name__ == "__main__":
    main()
