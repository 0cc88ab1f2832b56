"""PyTorch/transformers side of the SmolLM2 benchmarks in docs/benchmarks.md: the same work as
`align logprobs`, `align generate` and one `align dpo` step on the converted SmolLM2 folder.
Whole-process wall time (model load included, as for the align commands) and peak RSS.

    python benches/torch_smollm2.py logprobs MODEL_DIR tests/fixtures/smollm2/hh-rows.parquet
    python benches/torch_smollm2.py generate MODEL_DIR            # the two chat questions, greedy, 64 new tokens max
    python benches/torch_smollm2.py dpo MODEL_DIR tests/fixtures/smollm2/hh-rows.parquet   # 1 step, 2 pairs, LoRA r=4

The data handling is TRL's DPO tokenization (prompt with special tokens, completions without
plus EOS), batch 2 pairs, f32, eager attention, torch's default CPU threads.
"""

import resource
import sys
import time

T0 = time.time()
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

MARK = "\n\nAssistant:"
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


def pairs(tok, path, n=None):
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    out = []
    for row in pq.read_table(path).to_pylist():
        c, r = row["chosen"], row["rejected"]
        i = c.rfind(MARK)
        p = c[: i + len(MARK)]
        out.append((tok(p)["input_ids"], tok(c[len(p):], add_special_tokens=False)["input_ids"] + [eos],
                    tok(r[len(p):], add_special_tokens=False)["input_ids"] + [eos]))
    return out[:n] if n else out


def batch(seqs, pad):
    """Right-padded ids, attention mask and a completion mask per sequence (prompt_len, ids)."""
    L = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), L), pad)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    comp = torch.zeros((len(seqs), L - 1))
    for b, (p, c) in enumerate(seqs):
        s = p + c
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
        comp[b, len(p) - 1: len(s) - 1] = 1
    return ids, att, comp


def seq_logps(model, ids, att, comp):
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * comp).sum(-1)


def main():
    mode, model_dir = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    pad = tok.convert_tokens_to_ids(tok.eos_token)
    if mode == "logprobs":
        model.eval()
        ps = pairs(tok, sys.argv[3])
        t = time.time()
        with torch.no_grad():
            for i in range(0, len(ps), 2):
                chunk = ps[i: i + 2]
                seqs = [(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk]
                print(seq_logps(model, *batch(seqs, pad)).tolist())
        n = sum(2 * len(p) + len(c) + len(r) for p, c, r in ps)
        print(f"torch logprobs loop: {time.time() - t:.2f}s, {n} tokens, {n / (time.time() - t):.1f} tokens/s")
    elif mode == "generate":
        model.eval()
        for q in QUESTIONS:
            text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=pad, pad_token_id=pad)
            print(repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    elif mode == "dpo":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
        chunk = pairs(tok, sys.argv[3], 2)
        seqs = [(p, c) for p, c, _ in chunk] + [(p, r) for p, _, r in chunk]
        b = batch(seqs, pad)
        t = time.time()
        with torch.no_grad(), model.disable_adapter():
            ref = seq_logps(model, *b)
        pol = seq_logps(model, *b)
        n = len(chunk)
        logits = 0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
        loss = -F.logsigmoid(logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        print(f"loss {loss.item():.4f} step {time.time() - t:.2f}s")
    else:
        sys.exit(f"unknown mode {mode}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {mode}: wall {time.time() - T0:.2f}s peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
