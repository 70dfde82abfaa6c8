"""Driver: dptrain against Opacus 1.6 (hooks, ghost) and JAX Privacy 2.0, one table with ratios.

Creates the peers' virtual environments on first use (outside the project's: ``.bench-venvs/``,
git-ignored; ``python3.11 -m venv`` then ``pip install``), then runs every stack's script one after
the other, ``--rounds`` times in alternating order, on the same configuration: batch 64 rows of 129
tokens, byte vocabulary, width 128, 2 layers, 4 heads (multi-query), GeGLU 512, C = 1, σ = 1, Adam,
fp32, median of 30 steps after 3 warm-up steps. Examples/s per stack are the median over rounds;
ratios are taken within each round (same minutes of a shared machine) and their median printed.

    python bench/peers/run.py                 # create venvs if needed, 2 rounds
    python bench/peers/run.py --rounds 3 --json
    python bench/peers/run.py --malloc default   # glibc's default malloc for every stack

Every stack runs with the same C allocator settings: by default the ones the ``dptrain`` command
sets for itself (``dptrain/cli/_allocator.py``: jemalloc where installed, else glibc's malloc on
transparent huge pages), which speed up every stack; ``--malloc huge-pages`` (glibc's huge pages
only), ``jemalloc`` (refused where it is not installed) or ``default`` (glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

from dptrain.cli._allocator import CHOICE, OPT_OUT, find_jemalloc, tuned_environment

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
VENVS = ROOT / ".bench-venvs"
PEERS = {
    "opacus": ["torch==2.13.0", "opacus==1.6.0"],
    "jaxprivacy": ["jax==0.10.2", "jaxlib==0.10.2", "jax-privacy==2.0.0"],
}


def ensure_venv(name: str, python: str) -> pathlib.Path:
    """The peer's interpreter, creating its venv and installing its pins if missing."""
    venv = VENVS / name
    interpreter = venv / "bin" / "python"
    if not interpreter.exists():
        print(f"creating {venv} ({' '.join(PEERS[name])}) ...", file=sys.stderr)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(interpreter), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
    return interpreter


MALLOC = ("auto", "jemalloc", "huge-pages", "default")
_ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", CHOICE, OPT_OUT)


def allocator_environment(choice: str) -> dict[str, str]:
    """This process's environment with the allocator variables of ``choice`` (and no others)."""
    env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_VARIABLES}
    jemalloc = find_jemalloc()
    if choice == "jemalloc" and jemalloc is None:
        raise SystemExit("--malloc jemalloc: libjemalloc.so.2 is not installed "
                         "(Debian/Ubuntu: apt-get install libjemalloc2)")
    if choice == "default":
        return env
    mode = {"auto": "auto", "jemalloc": "auto", "huge-pages": "glibc"}[choice]
    tuned = tuned_environment({**env, CHOICE: mode}, system=platform.system(),
                              libc=platform.libc_ver(), jemalloc=lambda: jemalloc)
    return {k: v for k, v in (tuned or env).items() if k != CHOICE}


def describe(env: dict[str, str]) -> str:
    """The allocator variables of ``env``, for the table's footnote."""
    shown = [f"{k}={env[k]}" for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES") if k in env]
    return ", ".join(shown) or "glibc defaults"


def run_json(command: list[str], timeout: float, env: dict[str, str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--python", default="python3.11", help="interpreter for the peer venvs")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--malloc", choices=MALLOC, default="auto",
                        help="C allocator settings, the same for every stack (default: auto, "
                             "as the dptrain command runs: jemalloc where installed, else glibc "
                             "on huge pages)")
    args = parser.parse_args()
    env = allocator_environment(args.malloc)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    commands = {
        "dptrain": [sys.executable, str(HERE / "dptrain_step.py"), *common],
        "opacus": [str(ensure_venv("opacus", args.python)), str(HERE / "opacus_step.py"),
                   *common],
        "jax_privacy": [str(ensure_venv("jaxprivacy", args.python)),
                        str(HERE / "jax_privacy_step.py"), *common],
    }
    rounds = []
    for index in range(args.rounds):
        order = list(commands) if index % 2 == 0 else list(reversed(commands))
        measured = {}
        for name in order:
            print(f"round {index + 1}/{args.rounds}: {name} ...", file=sys.stderr)
            measured[name] = run_json(commands[name], timeout=1800, env=env)
            # Each result as it comes (a long run on a loaded machine keeps what it measured).
            print(json.dumps({"round": index + 1, name: measured[name]}), file=sys.stderr)
        rounds.append(measured)
    rows = {  # label: (stack, DP key, non-private key)
        "dptrain, ghost clipping": ("dptrain", "ghost", "non_private"),
        "dptrain, per-example (vmap(grad))": ("dptrain", "per_example", "non_private"),
        "Opacus 1.6, hooks": ("opacus", "hooks", "non_private"),
        "Opacus 1.6, ghost clipping": ("opacus", "ghost", "non_private"),
        "JAX Privacy 2.0, clipped_grad": ("jax_privacy", "dp", "non_private"),
    }

    def med(values: list[float]) -> float:
        return statistics.median(values)

    table = []
    for label, (stack, dp_key, plain_key) in rows.items():
        dp = [r[stack][dp_key] for r in rounds]
        plain = [r[stack][plain_key] for r in rounds]
        ghost = [r["dptrain"]["ghost"] for r in rounds]
        table.append({
            "stack": label, "dp_examples_per_s": med(dp), "non_private_examples_per_s": med(plain),
            "dp_over_non_private_time": med([p / d for p, d in zip(plain, dp, strict=True)]),
            "dptrain_ghost_speedup": med([g / d for g, d in zip(ghost, dp, strict=True)]),
            "dp_range": [min(dp), max(dp)]})
    compile_ratio = med([r["dptrain"]["ghost_compile_s"] / r["dptrain"]["non_private_compile_s"]
                         for r in rounds])
    if args.json:
        print(json.dumps({"table": table, "dptrain_compile_ratio": compile_ratio,
                          "malloc": args.malloc, "allocator": describe(env),
                          "rounds": rounds}, indent=2))
        return
    print("| stack | DP ex/s | non-private ex/s | DP / non-private (time) "
          "| dptrain ghost ÷ this DP |\n|---|---|---|---|---|")
    for row in table:
        print(f"| {row['stack']} | {row['dp_examples_per_s']:.1f} "
              f"({row['dp_range'][0]:.1f}–{row['dp_range'][1]:.1f}) "
              f"| {row['non_private_examples_per_s']:.1f} | {row['dp_over_non_private_time']:.2f} "
              f"| {row['dptrain_ghost_speedup']:.2f}× |")
    print(f"\ndptrain compile time, DP (ghost) / non-private: {compile_ratio:.2f}; "
          f"{args.rounds} round(s), medians; ratios taken within each round; malloc: "
          f"{args.malloc} ({describe(env)}) for every stack.")


if __name__ == "__main__":
    main()
