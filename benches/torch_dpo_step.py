"""PyTorch + PEFT reference for `align bench dpo`: the identical DPO steps on the identical
token ids, in a lean loop (no Trainer): chosen and rejected of every pair in one right-padded
batch, per-token log-probs of the completions summed per sequence, the reference from the same
model with the adapters disabled (LoRA) or a frozen copy (--full), sigmoid DPO loss with
beta 0.1, global-norm clipping at 1, AdamW (lr 1e-5 LoRA / 1e-6 full, no weight decay).

    align bench dpo --model DIR --data FILE --pairs-out pairs.json
    python benches/torch_dpo_step.py DIR pairs.json [--full] [--rank 8] [--warmup 2]

Prints a JSON line with the keys `align bench dpo --json` prints. Needs torch, transformers and
peft (a venv outside the repo); CPU, f32. scripts/bench-vs-torch.sh runs both side by side.
"""
import argparse
import json
import resource
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("pairs")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    data = json.load(open(a.pairs))
    pad = data["pad"]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.train()
    ref = None
    if a.full:
        ref = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=32, target_modules="all-linear",
                                                 lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6 if a.full else 1e-5, weight_decay=0.0)

    def batch(pairs):
        seqs = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
        t = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), t), dtype=torch.long)
        mask = torch.zeros((len(seqs), t - 1))
        for i, (p, c) in enumerate(seqs):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            att[i, :len(p) + len(c)] = 1
            mask[i, len(p) - 1:len(p) + len(c) - 1] = 1
        return ids, att, mask

    def seq_logps(m, ids, att, mask):
        logits = m(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask).sum(-1)

    times, toks = [], []
    for i, pairs in enumerate(data["steps"]):
        t0 = time.perf_counter()
        b = len(pairs)
        ids, att, mask = batch(pairs)
        logp = seq_logps(model, ids, att, mask)
        with torch.no_grad():
            if ref is not None:
                rlogp = seq_logps(ref, ids, att, mask)
            else:
                with model.disable_adapter():
                    rlogp = seq_logps(model, ids, att, mask)
        margin = (logp[:b] - rlogp[:b]) - (logp[b:] - rlogp[b:])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        n = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
        if a.verbose:
            print(f"step {i + 1} {n} tokens {dt:.3f} s loss {loss.item():.4f}", flush=True)
        if i >= a.warmup:
            times.append(dt)
            toks.append(n)
    med = statistics.median(times)
    per_tok = [t / n for t, n in zip(times, toks)]
    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "impl": "torch", "mode": "full" if a.full else "lora", "params": total,
        "trainable": sum(p.numel() for p in params), "steps": len(times),
        "s_per_step": med, "tokens_per_s": sum(toks) / sum(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "slowest_over_median": max(times) / med,
        "slowest_per_token_over_median": max(per_tok) / statistics.median(per_tok),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
