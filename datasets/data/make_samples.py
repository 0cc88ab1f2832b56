"""Generates the small committed samples and test fixtures of align-datasets.

Run from anywhere with the reference venv (pyarrow, tokenizers, transformers, trl):
    /work/pyref/bin/python datasets/data/make_samples.py [path/to/shared/data]
Deterministic: reruns give identical files.
"""
import json
import os
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "shared", "data")
MARK = "\n\nAssistant:"


def write(name, table, row_group_size=16):
    path = os.path.join(HERE, name)
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")
    print(f"{name}: {table.num_rows} rows, {os.path.getsize(path)} bytes")


def split_hh(c, r):
    """Same rule as align_datasets::split_hh: prompt = chosen up to its last marker."""
    kc = c.rfind(MARK)
    if kc < 0 or not r.startswith(c[:kc + len(MARK)]):
        return None
    e = kc + len(MARK)
    return c[:e], c[e:], r[e:]


def to_messages(transcript):
    """'\n\nHuman: a\n\nAssistant: b' -> [{'role': 'user', ...}, {'role': 'assistant', ...}]"""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    msgs = []
    for i in range(1, len(parts) - 1, 2):
        role = "user" if parts[i] == "Human" else "assistant"
        msgs.append({"role": role, "content": parts[i + 1].strip()})
    return msgs


hh = pq.read_table(os.path.join(SHARED, "hh-rlhf-harmless.parquet")).to_pylist()
gsm = pq.read_table(os.path.join(SHARED, "gsm8k-train.parquet")).to_pylist()

# 1. hh-sample.parquet: HH rows 0..62 plus row 1254, whose sides diverge early (1 skip).
rows = hh[:63] + [hh[1254]]
assert split_hh(hh[1254]["chosen"], hh[1254]["rejected"]) is None
write("hh-sample.parquet", pa.table({"chosen": [r["chosen"] for r in rows],
                                      "rejected": [r["rejected"] for r in rows]}))

# 2. pref-sample.parquet: explicit prompt/chosen/rejected strings (HH rows 100.. split).
pref = []
for r in hh[100:]:
    s = split_hh(r["chosen"], r["rejected"])
    if s and s[1] != s[2] and s[1].strip() and s[2].strip():
        pref.append(s)
    if len(pref) == 48:
        break
write("pref-sample.parquet", pa.table({"prompt": [p for p, _, _ in pref],
                                        "chosen": [c for _, c, _ in pref],
                                        "rejected": [x for _, _, x in pref]}))

# 3. chat-sample.parquet: conversational chosen/rejected message lists, implicit prompt.
msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
chat = []
for r in hh[200:]:
    c, j = to_messages(r["chosen"]), to_messages(r["rejected"])
    if (split_hh(r["chosen"], r["rejected"]) and len(c) == len(j) and c[:-1] == j[:-1]
            and c[-1] != j[-1] and c[-1]["role"] == "assistant" and c[-1]["content"] and j[-1]["content"]
            and all(m["content"] for m in c + j)):
        chat.append((c, j))
    if len(chat) == 32:
        break
write("chat-sample.parquet", pa.table({"chosen": pa.array([c for c, _ in chat], msg_type),
                                        "rejected": pa.array([j for _, j in chat], msg_type)}))

# 4. chat-prompt-sample.parquet: explicit prompt messages + one-message chosen/rejected.
write("chat-prompt-sample.parquet", pa.table({
    "prompt": pa.array([c[:-1] for c, _ in chat[:16]], msg_type),
    "chosen": pa.array([c[-1:] for c, _ in chat[:16]], msg_type),
    "rejected": pa.array([j[-1:] for _, j in chat[:16]], msg_type)}))

# 5. gsm8k-sample.parquet: first 32 GSM8K train rows (question, answer).
write("gsm8k-sample.parquet", pa.table({"question": [r["question"] for r in gsm[:32]],
                                         "answer": [r["answer"] for r in gsm[:32]]}))

# 6. tiny-tokenizer/: ByteLevel BPE, vocab 512, post-processor adds <s> (BOS).
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
corpus = [r["chosen"] for r in hh[:1500]] + [r["question"] + r["answer"] for r in gsm[:1500]]
tok.train_from_iterator(corpus, trainer=trainer)
tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
tdir = os.path.join(HERE, "tiny-tokenizer")
os.makedirs(tdir, exist_ok=True)
tok.save(os.path.join(tdir, "tokenizer.json"))
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'].strip()"
          " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>",
               "model_max_length": 2048, "chat_template": CHATML}, f, indent=2)

# 7. tiny-tokenizer-expected.json: reference tokenizations and chat renderings.
from transformers import PreTrainedTokenizerFast
from trl.data_utils import apply_chat_template, extract_prompt

hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tdir, "tokenizer.json"), bos_token="<s>",
                             eos_token="</s>", pad_token="<pad>")
hf.chat_template = CHATML


def dpo_tokenize(prompt, chosen, rejected, max_prompt_length, max_length):
    """The DPO tokenization align implements: prompt with special tokens, completions without
    + EOS; prompt keeps its last max_prompt_length tokens, completions their first
    max_length - len(prompt) tokens."""
    p = hf(prompt, add_special_tokens=True)["input_ids"]
    c = hf(chosen, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    r = hf(rejected, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    if max_prompt_length is not None:
        p = p[-max_prompt_length:]
    if max_length is not None:
        room = max_length - len(p)
        c, r = c[:room], r[:room]
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}


cases = []
for i, (p, c, r) in enumerate(pref[:12]):
    for mpl, ml in [(None, None), (24, 64)]:
        cases.append({"row": i, "prompt": p, "chosen": c, "rejected": r, "max_prompt_length": mpl,
                      "max_length": ml, "expected": dpo_tokenize(p, c, r, mpl, ml)})
renders = []
for i, (c, j) in enumerate(chat[:8]):
    out = apply_chat_template(extract_prompt({"chosen": c, "rejected": j}), hf)  # TRL: implicit prompt
    renders.append({"row": i, "prompt": out["prompt"], "chosen": out["chosen"], "rejected": out["rejected"]})
explicit = []
for i, (c, j) in enumerate(chat[:4]):
    out = apply_chat_template({"prompt": c[:-1], "chosen": c[-1:], "rejected": j[-1:]}, hf)
    explicit.append({"row": i, "prompt": out["prompt"], "chosen": out["chosen"], "rejected": out["rejected"]})
with open(os.path.join(HERE, "tiny-tokenizer-expected.json"), "w") as f:
    json.dump({"dpo": cases, "chat_implicit_prompt": renders, "chat_explicit_prompt": explicit,
               "bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id}, f, indent=1, ensure_ascii=False)
print("tiny-tokenizer-expected.json:", os.path.getsize(os.path.join(HERE, "tiny-tokenizer-expected.json")), "bytes")
