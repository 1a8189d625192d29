#!/usr/bin/env python3
"""Baseline for bench/generate.sh: the asyncio teacher client people usually write.

Reads prompts from a JSONL file, sends one streamed chat request per prompt with at
most C in flight (an asyncio.Semaphore), accumulates `reasoning_content` and
`content` from the SSE `data:` lines, and appends one JSON line per finished sample
to an output JSONL file. No retries, no cache, no resume: the cheapest thing that
works, so the comparison flatters Python rather than distill.

    generate_baseline.py --client aiohttp|openai URL PROMPTS.jsonl OUT.jsonl CONCURRENCY

Prints one JSON object: samples, wall seconds and CPU seconds (user+sys of this
process, measured with resource.getrusage around the requests; interpreter start-up
and imports excluded).
"""

import argparse
import asyncio
import json
import resource
import sys
import time

MODEL = "fake-r1"


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_aiohttp(url, prompts, out, concurrency):
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    # aiohttp's default connector allows 100 connections; allow C of them.
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    done = 0

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i, prompt):
            nonlocal done
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "stream": True,
                "temperature": 0.6,
                "top_p": 0.95,
                "max_tokens": 32768,
            }
            async with sem:
                reasoning, content, finish = [], [], None
                async with session.post(url + "/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for raw in resp.content:  # one line at a time
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            break
                        chunk = json.loads(data)
                        for choice in chunk.get("choices") or []:
                            delta = choice.get("delta") or {}
                            if delta.get("reasoning_content"):
                                reasoning.append(delta["reasoning_content"])
                            if delta.get("content"):
                                content.append(delta["content"])
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
                record = {
                    "idx": i,
                    "prompt": prompt,
                    "reasoning": "".join(reasoning),
                    "answer": "".join(content),
                    "finish_reason": finish,
                }
                out.write(json.dumps(record) + "\n")
                done += 1

        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return done


async def run_openai(url, prompts, out, concurrency):
    from openai import AsyncOpenAI

    # The package's default HTTP client and connection limits (1000 connections,
    # 100 kept alive): what people get.
    client = AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=None)
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(i, prompt):
        nonlocal done
        async with sem:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                stream=True,
                temperature=0.6,
                top_p=0.95,
                max_tokens=32768,
            )
            reasoning, content, finish = [], [], None
            async for chunk in stream:
                for choice in chunk.choices:
                    r = getattr(choice.delta, "reasoning_content", None)
                    if r:
                        reasoning.append(r)
                    if choice.delta.content:
                        content.append(choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
            record = {
                "idx": i,
                "prompt": prompt,
                "reasoning": "".join(reasoning),
                "answer": "".join(content),
                "finish_reason": finish,
            }
            out.write(json.dumps(record) + "\n")
            done += 1

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    await client.close()
    return done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", choices=["aiohttp", "openai"], default="aiohttp")
    ap.add_argument("url", help="base URL including /v1")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("concurrency", type=int)
    a = ap.parse_args()

    with open(a.prompts) as f:
        prompts = [json.loads(line)["problem"] for line in f if line.strip()]
    run = run_aiohttp if a.client == "aiohttp" else run_openai
    if a.client == "openai":
        import openai  # noqa: F401  (import cost outside the measurement)
    else:
        import aiohttp  # noqa: F401

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with open(a.out, "a") as out:
        done = asyncio.run(run(a.url, prompts, out, a.concurrency))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    print(json.dumps({"samples": done, "wall_s": wall, "cpu_s": cpu}))
    return 0 if done == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
