"""Load generator for any OpenAI-compatible chat-completions server.

    python bench/loadgen.py --base-url http://127.0.0.1:8000/v1 --workload shared-prefix \\
        --groups 8 --system-tokens 512 --questions 16 --rate 2 --max-tokens 16 \\
        --out bench/results/loadgen.json
    python bench/loadgen.py --base-url ... --workload mooncake --block-words 16 --speed 4 \\
        --limit 300 --out ...

Open loop: requests arrive on their own schedule (Poisson at ``--rate``, or a trace's
timestamps divided by ``--speed``), whatever the server's speed; ``--max-concurrency``
caps the requests in flight (later arrivals wait in the client; ``client_wait`` reports it,
and latencies count from the send). Every request streams (``stream_options.include_usage``)
so time to first token and inter-token gaps are measured per chunk and the usage gives
prompt, cached and completion tokens.

Workloads (all seeded: the same flags give the same requests, so policies compare fairly):
- ``shared-prefix``: ``--groups`` system prompts of ``--system-tokens`` tokens, each with
  ``--questions`` short questions; groups drawn uniformly or by Zipf popularity;
- ``multi-turn``: conversations whose every turn resends the history (a fixed synthetic
  assistant reply per turn), turns ``--think-s`` apart on average;
- ``unique``: prompts that share nothing (a unique opening, so even the template's system
  block differs);
- ``mooncake``: the Mooncake trace: each ``hash_id`` becomes a fixed run of ``--block-words``
  pseudo-random words (a 512-token block scaled down), arrivals from its timestamps;
- ``azure``: the Azure 2023 trace's arrivals and lengths (scaled by ``--length-scale``),
  unique prompts.

Text is made of common English words that are one token each in SmolLM2's tokenizer (and
in most BPE vocabularies), so N words are about N tokens and equal word runs tokenize alike.
Writes the JSON (summary, settings, per-request records) and, with ``--plot``, a latency
CDF and, when the requests' workers are known (``--router-log``: the router's log with its
routing decisions), each worker's requests in flight over time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
TRACES = ROOT / "data" / "traces"

WORDS = tuple("""able about above across act add after again age ago agree air all allow almost
alone along already also always among amount animal answer any appear apple area arm army around art
ask away baby back bad bag ball bank base basic bear beat become bed before begin behind believe
below best better between big bird black blood blue board boat body book born both box boy bread
break bring brother brown build burn business buy call came camp can capital car card care carry
case cat catch cause cell center chair chance change charge check child choose church city class
clean clear climb clock close cloud coast cold color come common company complete consider
contain control cook cool copy corn corner cost could count country course cover cross crowd cry
cup current cut dance dark day dead deal dear death decide deep degree design develop die differ
direct discuss doctor does dog dollar door double down draw dream dress drink drive drop dry
during duty each early earth east easy eat edge effect egg eight either else end enemy energy
enjoy enough enter equal even evening event ever every exact example except expect experience
eye face fact fair fall family famous far farm fast father fear feel field fight figure fill
final find fine finger finish fire firm first fish five flat floor flower fly follow food foot
force forest form forward four free fresh friend front fruit full game garden gas gather general
gentle girl give glass gold good got govern grass great green ground group grow guess guide hair
half hall hand happen happy hard hat have head health hear heart heat heavy help here high hill
history hold hole home hope horse hot hour house huge human hundred hunt idea inch include
industry inside instead iron island job join joy jump just keep key kill kind king kitchen knew
know lady lake land language large last late laugh law lead learn least leave left leg length
less letter level lie life lift light like line list listen little live long look lost love low
machine made main major make man many map mark market mass master match matter may meal mean
measure meat meet member memory metal middle might mile milk mind minute miss modern moment money
month moon more morning most mother mountain mouth move much music must name nation nature near
neck need never new next night nine noise north nose note nothing notice number object ocean
offer office often oil old once one only open order other over page paint pair paper parent park
part party pass past path pay people period person pick picture piece place plain plan plant play
please point poor position power press pretty price print problem produce public pull push put
question quick quiet race radio rain raise reach read ready real reason record red region
remember repeat reply rest result rich ride right ring rise river road rock roll room root rope
rose round rule run safe sail salt same sand save say school science sea season seat second
""".split())


def words(key: str, count: int) -> str:
    """``count`` pseudo-random words, always the same for the same ``key``."""
    rng = random.Random(key)  # str seeds hash with SHA-512: stable across processes
    return " ".join(rng.choices(WORDS, k=max(0, count)))


# -- workloads -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    """One request: when it arrives (seconds after the start), what it asks, and a tag
    (its group, conversation or trace row) for the report."""

    at_s: float
    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int
    tag: str


def poisson_arrivals(count: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` per second (rate <= 0: all at 0)."""
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        if rate > 0:
            t += rng.expovariate(rate)
    return out


def group_sequence(groups: int, per_group: int, popularity: str, zipf_s: float,
                   rng: random.Random) -> list[int]:
    """Which group each request belongs to: ``uniform`` gives each group exactly
    ``per_group`` requests in random order; ``zipf`` draws ``groups * per_group`` requests
    with P(group k) proportional to 1 / (k + 1) ** zipf_s."""
    total = groups * per_group
    if popularity == "uniform":
        order = [g for g in range(groups) for _ in range(per_group)]
        rng.shuffle(order)
        return order
    if popularity == "zipf":
        weights = [1 / (k + 1) ** zipf_s for k in range(groups)]
        return rng.choices(range(groups), weights=weights, k=total)
    raise ValueError(f"unknown popularity {popularity!r}")


def shared_prefix(*, groups: int, system_tokens: int, questions: int, question_tokens: int,
                  rate: float, max_tokens: int, popularity: str = "uniform",
                  zipf_s: float = 1.0, seed: int = 0) -> list[Planned]:
    rng = random.Random(seed)
    order = group_sequence(groups, questions, popularity, zipf_s, rng)
    arrivals = poisson_arrivals(len(order), rate, rng)
    systems = [words(f"system-{seed}-{g}", system_tokens) for g in range(groups)]
    return [Planned(at, (("system", systems[g]),
                         ("user", words(f"question-{seed}-{i}", question_tokens) + "?")),
                    max_tokens, f"group-{g}")
            for i, (g, at) in enumerate(zip(order, arrivals))]


def multi_turn(*, conversations: int, turns: int, system_tokens: int, user_tokens: int,
               reply_tokens: int, rate: float, think_s: float, max_tokens: int,
               seed: int = 0) -> list[Planned]:
    """Conversations starting as a Poisson process; turn k resends the system prompt and
    every earlier turn (with a fixed synthetic assistant reply), ``think_s`` (exponential
    mean) after turn k - 1 arrived."""
    rng = random.Random(seed)
    out: list[Planned] = []
    for c, start in enumerate(poisson_arrivals(conversations, rate, rng)):
        history: list[tuple[str, str]] = [("system", words(f"mt-system-{seed}-{c}",
                                                           system_tokens))]
        at = start
        for turn in range(turns):
            history.append(("user", words(f"mt-user-{seed}-{c}-{turn}", user_tokens) + "?"))
            out.append(Planned(at, tuple(history), max_tokens, f"conversation-{c}"))
            history.append(("assistant", words(f"mt-reply-{seed}-{c}-{turn}", reply_tokens)))
            at += rng.expovariate(1 / think_s) if think_s > 0 else 0.0
    out.sort(key=lambda p: p.at_s)
    return out


def unique(*, count: int, prompt_tokens: int, rate: float, max_tokens: int,
           seed: int = 0) -> list[Planned]:
    rng = random.Random(seed)
    return [Planned(at, (("system", f"request {seed}-{i}: " + words(f"u-sys-{seed}-{i}", 8)),
                         ("user", words(f"unique-{seed}-{i}", prompt_tokens))),
                    max_tokens, "unique")
            for i, at in enumerate(poisson_arrivals(count, rate, rng))]


def mooncake(path: Path, *, block_words: int, speed: float, limit: int | None,
             output_scale: float, max_tokens: int) -> list[Planned]:
    """Each 512-token ``hash_id`` block becomes ``block_words`` words (the last block in
    proportion to its length); outputs are scaled by ``output_scale``, at most
    ``max_tokens``."""
    out: list[Planned] = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            ids = row["hash_ids"]
            last = row["input_length"] - 512 * (len(ids) - 1)
            runs = [words(f"block-{h}", block_words) for h in ids[:-1]]
            runs.append(words(f"block-{ids[-1]}", max(1, round(block_words * last / 512))))
            tokens = max(1, min(max_tokens, round(row["output_length"] * output_scale)))
            out.append(Planned(row["timestamp"] / 1000 / speed, (("user", " ".join(runs)),),
                               tokens, f"row-{i}"))
    return out


def azure(path: Path, *, speed: float, limit: int | None, length_scale: float,
          max_tokens: int, max_prompt_tokens: int) -> list[Planned]:
    out: list[Planned] = []
    start: dt.datetime | None = None
    with open(path) as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and i >= limit:
                break
            stamp = dt.datetime.fromisoformat(row["TIMESTAMP"][:26])
            start = start or stamp
            prompt = min(max_prompt_tokens, round(int(row["ContextTokens"]) * length_scale))
            tokens = max(1, min(max_tokens, round(int(row["GeneratedTokens"]) * length_scale)))
            out.append(Planned((stamp - start).total_seconds() / speed,
                               (("system", f"azure request {i}"),
                                ("user", words(f"azure-{i}", max(1, prompt)))),
                               tokens, f"row-{i}"))
    return out


def ideal_cached_ratio(plan: Sequence[Planned], encode: Callable[[list[dict]], list[int]],
                       block_size: int) -> float:
    """Cached prompt tokens over prompt tokens with one infinite cache: each request hits the
    leading full blocks any earlier request had (never its last token, which is always
    recomputed), in arrival order."""
    from core.hashing import block_hashes  # the router's and workers' own hashing

    seen: set[int] = set()
    cached = total = 0
    for p in sorted(plan, key=lambda p: p.at_s):
        ids = encode([{"role": r, "content": c} for r, c in p.messages])
        hashes = block_hashes(ids, block_size)
        run = 0
        for h in hashes[: (len(ids) - 1) // block_size]:
            if h not in seen:
                break
            run += 1
        seen.update(hashes)
        cached += run * block_size
        total += len(ids)
    return cached / total if total else 0.0


# -- the client ------------------------------------------------------------------------------------

@dataclass
class Result:
    tag: str
    scheduled_s: float                 # planned arrival, from the start
    sent_s: float = 0.0                # when it got a concurrency slot and was sent
    first_token_s: float | None = None
    finished_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between content chunks
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    completion_id: str | None = None
    worker: str | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.sent_s


async def _send(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                result: Result, clock: Callable[[], float]) -> None:
    result.sent_s = clock()
    last: float | None = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            result.error = f"HTTP {response.status_code}: {text[:300]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                continue
            result.completion_id = result.completion_id or chunk.get("id")
            usage = chunk.get("usage")
            if usage:
                result.prompt_tokens = usage.get("prompt_tokens", 0)
                details = usage.get("prompt_tokens_details") or {}
                result.cached_tokens = details.get("cached_tokens") or 0
                result.completion_tokens = usage.get("completion_tokens", 0)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls") or choice.get(
                        "finish_reason"):
                    now = clock()
                    if result.first_token_s is None:
                        result.first_token_s = now
                    elif delta.get("content") and last is not None:
                        result.gaps_s.append(now - last)
                    last = now
    if result.error is None:
        result.finished_s = clock()


async def run(plan: Sequence[Planned], base_url: str, *, model: str = "electron",
              api_key: str = "sk-local", max_concurrency: int = 0, ignore_eos: bool = False,
              temperature: float = 0.0, timeout_s: float = 600.0,
              extra_body: Mapping[str, Any] | None = None,
              transport: httpx.AsyncBaseTransport | None = None
              ) -> tuple[list[Result], float]:
    """Sends ``plan`` open-loop; returns the results (in plan order) and the wall time from
    the start to the last request's end. ``transport``: httpx's (default: the network)."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    limits = httpx.Limits(max_connections=max_concurrency or None, max_keepalive_connections=64)
    loop = asyncio.get_running_loop()
    start = loop.time()

    def clock() -> float:
        return loop.time() - start

    async def one(p: Planned, result: Result) -> None:
        await asyncio.sleep(max(0.0, p.at_s - clock()))
        body = {"model": model, "messages": [{"role": r, "content": c} for r, c in p.messages],
                "max_tokens": p.max_tokens, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}, **(extra_body or {})}
        if ignore_eos:
            body["ignore_eos"] = True
        try:
            if slots is None:
                await _send(client, url, body, result, clock)
            else:
                async with slots:
                    await _send(client, url, body, result, clock)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:300]

    results = [Result(p.tag, p.at_s) for p in plan]
    async with httpx.AsyncClient(headers=headers, limits=limits, transport=transport,
                                 timeout=httpx.Timeout(timeout_s, connect=30.0)) as client:
        await asyncio.gather(*(one(p, r) for p, r in zip(plan, results)))
    return results, clock()


# -- statistics ------------------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None when there are no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def _dist(values: list[float], prefix: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"{prefix}_p{q}": percentile(values, q) for q in (50, 90, 99)}
    out[f"{prefix}_mean"] = sum(values) / len(values) if values else None
    return out


def summarise(results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.finished_s is not None]
    errors = [r.error for r in results if r.error is not None]
    ends = [r.finished_s for r in ok if r.finished_s is not None]
    begin = min((r.sent_s for r in results), default=0.0)
    duration = (max(ends) - begin) if ends else wall_s
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    output = sum(r.completion_tokens for r in ok)
    tpot = [(r.finished_s - r.first_token_s) / (r.completion_tokens - 1) for r in ok
            if r.first_token_s is not None and r.finished_s is not None
            and r.completion_tokens > 1]
    return {
        "requests": len(results), "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5], "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": output / duration if duration > 0 else None,
        **_dist([r.ttft_s for r in ok if r.ttft_s is not None], "ttft_s"),
        **_dist([g for r in ok for g in r.gaps_s], "itl_s"),
        "tpot_mean_s": sum(tpot) / len(tpot) if tpot else None,
        **_dist([r.e2e_s for r in ok if r.e2e_s is not None], "e2e_s"),
        **_dist([r.sent_s - r.scheduled_s for r in results], "client_wait_s"),
        "prompt_tokens": prompt, "cached_tokens": cached, "output_tokens": output,
        "cached_token_ratio": cached / prompt if prompt else None,
    }


DECISION = re.compile(r"request (chatcmpl-[0-9a-f]+) -> worker (\S+?):")


def attribute_workers(results: Sequence[Result], router_log: str) -> int:
    """Sets each result's worker from the router's decision lines (the last decision for its
    completion id: a retry's); returns how many were found."""
    workers = dict(DECISION.findall(router_log))
    found = 0
    for r in results:
        if r.completion_id in workers:
            r.worker = workers[r.completion_id]
            found += 1
    return found


# -- plots -----------------------------------------------------------------------------------------

def plot_latency_cdfs(runs: Mapping[str, Sequence[Result]], path: Path, title: str) -> None:
    """TTFT and end-to-end latency CDFs, one line per run (e.g. per policy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, results in runs.items():
        for ax, values in ((axes[0], [r.ttft_s for r in results if r.ttft_s is not None]),
                           (axes[1], [r.e2e_s for r in results if r.e2e_s is not None])):
            ordered = sorted(values)
            if ordered:
                ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))],
                        where="post", label=label)
    for ax, name in zip(axes, ("time to first token (s)", "end-to-end latency (s)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_worker_load(results: Sequence[Result], path: Path, title: str) -> None:
    """Requests in flight on each worker over time (from sent to finished)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_worker: dict[str, list[tuple[float, int]]] = {}
    for r in results:
        if r.worker is None:
            continue
        end = r.finished_s if r.finished_s is not None else r.sent_s
        by_worker.setdefault(r.worker, []).extend(((r.sent_s, 1), (end, -1)))
    fig, ax = plt.subplots(figsize=(11, 4))
    for worker, changes in sorted(by_worker.items()):
        changes.sort()
        level, xs, ys = 0, [0.0], [0]
        for t, d in changes:
            level += d
            xs.append(t)
            ys.append(level)
        ax.step(xs, ys, where="post", label=f"{worker} ({len(changes) // 2} requests)")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests in flight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------------

def build_plan(args: argparse.Namespace) -> list[Planned]:
    w = args.workload
    if w == "shared-prefix":
        return shared_prefix(groups=args.groups, system_tokens=args.system_tokens,
                             questions=args.questions, question_tokens=args.question_tokens,
                             rate=args.rate, max_tokens=args.max_tokens,
                             popularity=args.popularity, zipf_s=args.zipf_s, seed=args.seed)
    if w == "multi-turn":
        return multi_turn(conversations=args.conversations, turns=args.turns,
                          system_tokens=args.system_tokens, user_tokens=args.question_tokens,
                          reply_tokens=args.reply_tokens, rate=args.rate,
                          think_s=args.think_s, max_tokens=args.max_tokens, seed=args.seed)
    if w == "unique":
        return unique(count=args.num_requests, prompt_tokens=args.prompt_tokens,
                      rate=args.rate, max_tokens=args.max_tokens, seed=args.seed)
    if w == "mooncake":
        return mooncake(args.trace or TRACES / "mooncake/conversation_trace.jsonl",
                        block_words=args.block_words, speed=args.speed, limit=args.limit,
                        output_scale=args.output_scale, max_tokens=args.max_tokens)
    return azure(args.trace or TRACES / "azure2023/AzureLLMInferenceTrace_conv.csv",
                 speed=args.speed, limit=args.limit, length_scale=args.length_scale,
                 max_tokens=args.max_tokens, max_prompt_tokens=args.prompt_tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="electron")
    p.add_argument("--api-key", default="sk-local")
    p.add_argument("--workload", required=True,
                   choices=("shared-prefix", "multi-turn", "unique", "mooncake", "azure"))
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=0, help="0: no cap")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--questions", type=int, default=8, help="questions per group")
    p.add_argument("--question-tokens", type=int, default=16)
    p.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--reply-tokens", type=int, default=48)
    p.add_argument("--think-s", type=float, default=5.0)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=256,
                   help="unique: prompt length; azure: longest prompt")
    p.add_argument("--trace", type=Path, help="mooncake / azure trace file")
    p.add_argument("--speed", type=float, default=1.0, help="trace time speed-up")
    p.add_argument("--limit", type=int, help="trace rows to replay")
    p.add_argument("--block-words", type=int, default=16, help="mooncake: words per block")
    p.add_argument("--output-scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=0.1, help="azure: length factor")
    p.add_argument("--router-log", type=Path, help="router log with routing decisions")
    p.add_argument("--ideal-tokenizer", help="model name/path: report the ideal cached ratio")
    p.add_argument("--block-size", type=int, default=16, help="KV block size, for the ideal")
    p.add_argument("--plot", action="store_true", help="write PNGs beside --out")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/loadgen.json")
    return p.parse_args(argv)


def chat_encoder(model: str) -> Callable[[list[dict]], list[int]]:
    """Token ids of a chat as the router renders and tokenizes it."""
    from core.model_files import resolve_model_path
    from core.tokenizer import Tokenizer

    return Tokenizer.from_model_path(resolve_model_path(model)).encode_chat


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    started = time.time()
    results, wall = asyncio.run(run(plan, args.base_url, model=args.model,
                                    api_key=args.api_key, max_concurrency=args.max_concurrency,
                                    ignore_eos=args.ignore_eos, temperature=args.temperature))
    summary = summarise(results, wall)
    if args.ideal_tokenizer:
        ideal = ideal_cached_ratio(plan, chat_encoder(args.ideal_tokenizer), args.block_size)
        summary["ideal_cached_token_ratio"] = ideal
    if args.router_log:
        summary["requests_with_known_worker"] = attribute_workers(
            results, args.router_log.read_text(errors="replace"))
    out = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
           "summary": summary, "requests": [asdict(r) for r in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot_latency_cdfs({args.workload: results}, args.out.with_suffix(".cdf.png"),
                          f"{args.workload} @ {args.base_url}")
        if any(r.worker for r in results):
            plot_worker_load(results, args.out.with_suffix(".load.png"), args.workload)
    print(json.dumps({k: v for k, v in summary.items() if k != "error_samples"}, indent=1))
    for sample in summary["error_samples"]:
        print("error:", sample, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
