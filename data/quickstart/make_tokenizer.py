"""Builds the quickstart student's tokenizer (run once; the output is committed).

A byte-level BPE in Qwen2's style (digits split one per token, ChatML special tokens,
`<think>`/`</think>` as added tokens, R1-distill chat template whose generation prompt
opens `<think>\n`), but with a 512-entry vocabulary learnt from the synthetic arithmetic
word problems the quickstart uses, so that a student of a few million parameters spends
its capacity on the task rather than on an embedding table. Byte-level means any text
still encodes; only this family encodes compactly.

    python3 data/quickstart/make_tokenizer.py   # writes data/quickstart/tokenizer/
"""

import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tokenizer")

NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"),
         ("Max", "He"), ("Ivy", "She"), ("Ben", "He"), ("Ana", "She"), ("Tom", "He")]
ITEMS = ["pencils", "apples", "stamps", "marbles", "books", "shells", "coins", "cards",
         "stickers", "beads"]
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def problem(rng):
    """A problem and its working in both of the simulated teacher's main styles, in the
    wording of teacher/src/sim/ (only word frequencies matter here)."""
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    v = start = rng.randint(2, 12)
    text = f"{name} has {start} {item}."
    work0 = ["Okay, let me work through this step by step.", f"{name} starts with {start} {item}."]
    work1 = [f"Let me count {name}'s {item} one step at a time.", f"{name} has {start} {item} at first."]
    for _ in range(rng.randint(2, 3)):
        k = rng.randint(0, 2)
        if k == 0 or (k == 1 and v <= 1):
            n = rng.randint(1, 5)
            says, total, link = f"{pron} buys {n} more", f"{v} + {n} = {v + n}", "makes"
            v += n
        elif k == 1 or v > 15:
            n = rng.randint(1, min(v, 5))
            says, total, link = f"{pron} gives away {n}", f"{v} - {n} = {v - n}", "leaves"
            v -= n
        else:
            says, total, link = f"{pron} doubles them", f"{v} * 2 = {v * 2}", "makes"
            v *= 2
        text += f" {says}."
        work0.append(f"{says}, so {total}.")
        work1.append(f"{says}, which {link} {total}.")
    text += f" How many {item} does {name} have now?"
    work0.append(f"So {name} has {v} {item} now.")
    work1.append(f"That leaves {name} with {v} {item}.")
    return text, work0, work1, v


def corpus(n=20000, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        text, work0, work1, v = problem(rng)
        name, item = text.split()[0], text.split()[3].rstrip(".")
        yield f"{text}\n{INSTRUCTION}"
        yield "\n".join(work0)
        yield "\n".join(work1)
        yield f"{name} has {v} {item} now.\n\n**Answer:** \\boxed{{{v}}}"


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]

# R1-distill's template, reduced to ChatML turns: assistant turns drop the reasoning
# (as DeepSeek's does), and the generation prompt opens the thinking block.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=SPECIAL + THINK,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "tokenizer.json")
    tok.save(path)
    data = json.load(open(path))
    # `<think>` tags are added tokens but not special: decoding keeps them, as in R1.
    for t in data["added_tokens"]:
        if t["content"] in THINK:
            t["special"] = False
    json.dump(data, open(path, "w"), ensure_ascii=False, indent=1)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    json.dump(config, open(os.path.join(OUT, "tokenizer_config.json"), "w"), indent=1)
    t = Tokenizer.from_file(path)
    sample = "Mia has 128 pencils. She doubles them.\n<think>\nSo 128 * 2 = 256.\n</think>\n\n\\boxed{256}<|im_end|>"
    enc = t.encode(sample)
    assert t.decode(enc.ids, skip_special_tokens=False) == sample, t.decode(enc.ids)
    print(f"vocab {t.get_vocab_size()}; {len(enc.ids)} tokens for {len(sample)} chars: {enc.tokens}")


if __name__ == "__main__":
    main()
