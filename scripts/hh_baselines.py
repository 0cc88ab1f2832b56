"""Non-neural baselines for held-out accuracy on an HH preference split (docs/dpo.md).

What can a model learn from these pairs at all? Two yardsticks, on the same eval pairs that
`align dpo` reports `eval_rewards/accuracies` on:
  length     "the shorter reply is preferred" (ties count half)
  bag-of-tokens  L2-regularised logistic regression on (token counts of the chosen reply minus
             those of the rejected reply, plus the length difference), fitted on the train
             pairs; tokens from the start model's tokenizer. Reported for several strengths.
Usage: python scripts/hh_baselines.py runs/hh-start    (needs pyarrow, numpy, tokenizers, torch)
"""
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

MARK = "\n\nAssistant:"
root = sys.argv[1] if len(sys.argv) > 1 else "runs/hh-start"
tok = Tokenizer.from_file(f"{root}/model/tokenizer.json")
V = tok.get_vocab_size()


def features(path):
    rows = pq.read_table(path).to_pylist()
    X, dlen = [], []
    for r in rows:
        c, j = r["chosen"], r["rejected"]
        k = c.rfind(MARK) + len(MARK)
        ci = tok.encode(c[k:], add_special_tokens=False).ids
        ji = tok.encode(j[k:], add_special_tokens=False).ids
        v = np.zeros(V + 1)
        np.add.at(v, ci, 1)
        np.add.at(v, ji, -1)
        v[V] = len(ci) - len(ji)
        X.append(v)
        dlen.append(len(ci) - len(ji))
    return torch.tensor(np.array(X)), np.array(dlen)


def accuracy(score):
    score = torch.as_tensor(score, dtype=torch.float64)
    return ((score > 0).double().mean() + 0.5 * (score == 0).double().mean()).item()


Xt, _ = features(f"{root}/prefs-train.parquet")
Xe, de = features(f"{root}/prefs-eval.parquet")
print(f"{len(Xt)} train pairs, {len(Xe)} eval pairs")
print(f"length (shorter reply wins): eval accuracy {accuracy(-de):.3f}")
for l2 in [1e-3, 1e-2, 3e-2, 1e-1]:
    w = torch.zeros(V + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(Xt @ w)).mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        print(f"bag-of-tokens l2={l2:g}: train {accuracy(Xt @ w):.3f}  eval {accuracy(Xe @ w):.3f}")
