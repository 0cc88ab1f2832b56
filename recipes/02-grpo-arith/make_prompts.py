"""Write the prompt sets of recipe 02: small additions, verified by align's `gsm8k` reward.

    python make_prompts.py OUT_DIR      # OUT_DIR/train.parquet, OUT_DIR/eval.parquet

Each row: `prompt`, a one-message chat ([{role: user, content: "What is A + B?"}]) that the
model's chat template renders, with A and B in 1..20, and `answer`, "#### A+B" (the `gsm8k`
reward compares the last number of the completion with it). The 400 (A, B) pairs are shuffled
with a fixed seed and split 320 / 80, so train and eval items are disjoint. Needs pyarrow.
"""

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LO, HI, EVAL = 1, 20, 80


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    items = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1)]
    random.Random(20261204).shuffle(items)
    for name, part in (("train", items[EVAL:]), ("eval", items[:EVAL])):
        table = pa.table(
            {
                "prompt": [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in part],
                "answer": [f"#### {a + b}" for a, b in part],
            }
        )
        pq.write_table(table, out / f"{name}.parquet")
        print(f"{out / name}.parquet: {len(part)} prompts")


if __name__ == "__main__":
    main()
