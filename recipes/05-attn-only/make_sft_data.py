"""Write the SFT sets of recipe 05 from GSM8K (../../../shared/data/, MIT):

    python make_sft_data.py [SHARED_DATA_DIR] [OUT_DIR] [TRAIN_ROWS]
                            # OUT_DIR/sft-{train,eval}.parquet; with TRAIN_ROWS, only
                            # sft-train.parquet, of that many rows (recipe 04 writes its 640)

Each row: `messages`, a two-message chat [{user: question}, {assistant: reasoning "#### n"}]
that the model's chat template renders (the assistant message is the completion, trained on
and scored). Train: the first 320 rows of gsm8k-train after a fixed shuffle; eval: the first
200 of gsm8k-test after another. Rows longer than 560 characters are left out so that every
example fits `max_length` 256 whole. Needs pyarrow.
"""

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TRAIN, EVAL, MAX_CHARS = 320, 200, 560


def rows(path, n, seed):
    t = pq.read_table(path).to_pylist()
    t = [r for r in t if len(r["question"]) + len(r["answer"]) <= MAX_CHARS]
    random.Random(seed).shuffle(t)
    return t[:n]


def main():
    here = Path(__file__).resolve().parent
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "../../../shared/data"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "data"
    out.mkdir(parents=True, exist_ok=True)
    sets = [
        ("sft-train", "gsm8k-train.parquet", TRAIN, 20261204),
        ("sft-eval", "gsm8k-test.parquet", EVAL, 20261205),
    ]
    if len(sys.argv) > 3:
        sets = [("sft-train", "gsm8k-train.parquet", int(sys.argv[3]), 20261204)]
    for name, src, n, seed in sets:
        part = rows(shared / src, n, seed)
        table = pa.table(
            {
                "messages": [
                    [
                        {"role": "user", "content": r["question"]},
                        {"role": "assistant", "content": r["answer"]},
                    ]
                    for r in part
                ]
            }
        )
        pq.write_table(table, out / f"{name}.parquet")
        print(f"{out / name}.parquet: {len(part)} rows")


if __name__ == "__main__":
    main()
