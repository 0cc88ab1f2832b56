"""Data for the embedded default (assets/default), called by scripts/make-default.sh.

Splits HH-RLHF harmless (2,000 rows) with a fixed permutation into
  sft.parquet          chosen transcripts of every row NOT in the eval split (SFT text)
  prefs-train.parquet  preference pairs for DPO (train split)
  prefs-eval.parquet   held-out preference pairs (eval split; never seen by SFT or DPO)
Usage: python make_default_data.py HH.parquet OUT_DIR MODE N_TRAIN N_EVAL [SFT_TEXT]
SFT_TEXT `chosen` (default): the chosen transcripts of the non-eval rows, whole.
SFT_TEXT `both-tails`: the chosen AND the rejected transcript of every non-eval row, each cut
to its last turns (at most 700 characters, starting at a "\n\nHuman:"), shuffled. This is
the SFT text of the HH start model (scripts/make-hh-start.sh): a model SFT-trained on the
chosen side only has partly memorised the chosen replies of the DPO train pairs, so DPO from it
learns "more like what SFT saw", which does not carry over to held-out pairs; both sides keep
the start neutral, and the tails are what DPO sees (the last prompt turns and the reply).
MODE `hh`: the real HH chosen/rejected transcripts.
MODE `shuffled`: prompt/chosen/rejected with chosen = the real chosen reply and rejected = the
same reply with its words shuffled (seeded); prompts are the last human turn
(<= 300 chars), replies their first 40 words: an easy, clearly synthetic preference (fluent vs
scrambled) that a tiny model can learn and generalise in a couple of minutes of DPO.
Deterministic: reruns give identical files.
"""
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

MARK = "\n\nAssistant:"
src, out, mode, n_train, n_eval = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sft_text = sys.argv[6] if len(sys.argv) > 6 else "chosen"
if mode not in ("hh", "shuffled") or sft_text not in ("chosen", "both-tails"):
    sys.exit(f"usage: {sys.argv[0]} HH.parquet OUT_DIR hh|shuffled N_TRAIN N_EVAL [chosen|both-tails]")
t = pq.read_table(src).to_pydict()
chosen, rejected = t["chosen"], t["rejected"]
n = len(chosen)
perm = list(range(n))
random.Random(0).shuffle(perm)
eval_rows = perm[:n_eval]
train_rows = perm[n_eval:]


def usable(i):
    c, r = chosen[i], rejected[i]
    k = c.rfind(MARK)
    if k < 0:
        return False
    p = c[: k + len(MARK)]
    return r.startswith(p) and c[len(p):].strip() != "" and c != r and len(c) < 2000


def pairs(rows, limit, rng):
    P, C, R, HC, HR = [], [], [], [], []
    for i in rows:
        if len(P) >= limit:
            break
        if not usable(i):
            continue
        c = chosen[i]
        k = c.rfind(MARK) + len(MARK)
        prompt, reply = c[:k], c[k:]
        words = reply.split()
        if mode == "shuffled":
            # Short sequences so DPO is quick on a CPU: the last human turn only, and the
            # reply's first 40 words.
            h = prompt.rfind("\n\nHuman:")
            prompt = prompt[h:] if h >= 0 else prompt
            if len(prompt) > 300:
                continue
            words = words[:40]
            reply = " " + " ".join(words)
            if len(words) < 4:
                continue
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            bad = " " + " ".join(shuffled)
            P.append(prompt); C.append(reply); R.append(bad)
        else:
            HC.append(c); HR.append(rejected[i]); P.append(None)
    if mode == "shuffled":
        return pa.table({"prompt": P, "chosen": C, "rejected": R})
    return pa.table({"chosen": HC, "rejected": HR})


rng = random.Random(1)
pq.write_table(pairs(train_rows, n_train, rng), f"{out}/prefs-train.parquet", compression="zstd", row_group_size=256)
pq.write_table(pairs(eval_rows, n_eval, rng), f"{out}/prefs-eval.parquet", compression="zstd", row_group_size=256)


def tail(text, limit=700):
    """The last turns of a transcript: from the earliest "\n\nHuman:" whose tail fits in
    `limit` characters (the last one if none does)."""
    starts = [k for k in range(len(text)) if text.startswith("\n\nHuman:", k)]
    for k in starts:
        if len(text) - k <= limit:
            return text[k:]
    return text[starts[-1]:] if starts else text


if sft_text == "chosen":
    sft = [chosen[i] for i in train_rows]
else:
    sft = [tail(chosen[i]) for i in train_rows] + [tail(rejected[i]) for i in train_rows]
    random.Random(2).shuffle(sft)
pq.write_table(pa.table({"text": sft}), f"{out}/sft.parquet", compression="zstd", row_group_size=256)
for f in ["prefs-train", "prefs-eval", "sft"]:
    print(f, pq.read_metadata(f"{out}/{f}.parquet").num_rows, "rows")
