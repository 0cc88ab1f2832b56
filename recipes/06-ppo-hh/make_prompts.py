"""Write recipe 06's PPO prompt sets from recipe 01's HH split.

    python make_prompts.py DATA_DIR   # reads DATA_DIR/prefs-{train,eval}.parquet,
                                      # writes DATA_DIR/prompts-{train,eval}.parquet

Each HH transcript's `chosen` side is cut after its last "\\n\\nAssistant:" (the prompt both
replies share, as align's HH reader splits it); the result is a `prompt` text column, which
`align ppo` and `align compare` encode as is (no chat template), like the reward model saw its
transcripts. Rows without that marker are dropped and counted. Needs pyarrow.
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MARK = "\n\nAssistant:"


def main():
    d = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for part in ("train", "eval"):
        chosen = pq.read_table(d / f"prefs-{part}.parquet", columns=["chosen"]).column(0)
        prompts, dropped = [], 0
        for c in chosen.to_pylist():
            i = (c or "").rfind(MARK)
            if i < 0:
                dropped += 1
                continue
            prompts.append(c[: i + len(MARK)])
        pq.write_table(pa.table({"prompt": prompts}), d / f"prompts-{part}.parquet")
        print(f"prompts-{part}.parquet: {len(prompts)} prompts ({dropped} rows without {MARK!r} dropped)")


if __name__ == "__main__":
    main()
