"""PyTorch + PEFT reference for `align bench train`: one training step (forward, backward,
AdamW) of the same ~26M-parameter llama (hidden 512, MLP 1408, 6 layers, 8 heads / 4 kv,
vocab 8192), batch 4 x 256 random tokens, loss = mean NLL of the second half of each
sequence; LoRA r=8 on every linear layer (PEFT) vs full fine-tuning. Each mode runs in its own
process so that its peak RSS is its own.

    python benches/torch_train_step.py            # prints the table
Needs torch, transformers, peft (a venv outside the repo). CPU only.
"""
import json
import resource
import statistics
import subprocess
import sys
import time


def one(mode, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(3, 8192, (4, 256))
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -lp[:, 127:].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t0)
    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({"mode": mode, "params": total, "trainable": sum(p.numel() for p in params),
                      "step_s": statistics.median(times),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    import os
    threads = os.cpu_count() or 1
    print(f"PyTorch: one training step, 4 x 256 tokens, cpu (f32), {threads} threads")
    print("| mode | params (M) | trainable | step time (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for mode in ["lora", "full"]:
        out = subprocess.run([sys.executable, __file__, "--one", mode, str(threads)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['mode']} | {r['params'] / 1e6:.1f} | {r['trainable']} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} |")
