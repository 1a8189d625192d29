"""What a quickstart student learned to copy: per-token loss of its exported checkpoint on the
run's own kept traces, split into the item's noun, each step's operand, and everything else.

    python3 bench/quickstart_copying.py RUN_DIR [N_TRACES]

RUN_DIR holds the run's `distill.db` and `runs/quickstart/export/` (what `distill run
examples/quickstart.toml` leaves). Needs torch and transformers; runs on one CPU thread in
seconds. A student that copies a kind of token from the problem scores it near 0 nats; one that
guesses it scores about ln(choices) (1.6 nats for operands 1-5, 2.3 for the ten nouns).
The README's Machine dependence paragraph explains why this matters.
"""

import re
import sqlite3
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def kept_traces(db: Path, limit: int):
    """(problem, reasoning, answer) of traces the last curation stage kept."""
    con = sqlite3.connect(db)
    return con.execute(
        """
        SELECT p.prompt, g.reasoning, g.answer
        FROM verdicts v
        JOIN stages s ON s.id = v.stage_id AND s.name = 'clean'
        JOIN generations g ON g.id = v.generation_id
        JOIN prompts p ON p.id = g.prompt_id
        WHERE v.kept = 1
        ORDER BY g.id
        LIMIT ?
        """,
        (limit,),
    ).fetchall()


def main() -> None:
    run = Path(sys.argv[1])
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    torch.set_num_threads(1)
    export = run / "runs" / "quickstart" / "export"
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    totals = {"noun": [0.0, 0], "operand": [0.0, 0], "other": [0.0, 0]}
    for problem, reasoning, answer in kept_traces(run / "distill.db", limit):
        noun = re.match(r"\w+ has \d+ (\w+)", problem).group(1)
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False
        )
        # The trainer's target: the generation prompt ends with `<think>\n`.
        target = f"{reasoning}\n</think>\n\n{answer}{tok.eos_token}"
        p_ids = tok(prompt)["input_ids"]
        t_ids = tok(target)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + t_ids])).logits[0]
        logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], dim=-1)
        nll = (-logp[torch.arange(len(t_ids)), torch.tensor(t_ids)]).tolist()
        for j, t in enumerate(t_ids):
            text = tok.decode([t]).strip()
            before = tok.decode(t_ids[:j])
            if text == noun:
                kind = "noun"
            elif text.isdigit() and re.search(r"(away|buys)\s*$", before):
                kind = "operand"
            else:
                kind = "other"
            totals[kind][0] += nll[j]
            totals[kind][1] += 1
    parts = ", ".join(f"{k} {s / max(n, 1):.3f} nats ({n} tokens)" for k, (s, n) in totals.items())
    print(f"{run}: {parts}")


if __name__ == "__main__":
    main()
