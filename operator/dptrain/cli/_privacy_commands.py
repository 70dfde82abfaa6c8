"""`dptrain epsilon` and `dptrain calibrate`: the accountant from the command line."""

from __future__ import annotations

import argparse
import time
from typing import Any

from dptrain.cli._output import EXIT_INVALID, emit, fail

# dp-accounting takes seconds to import (scipy.stats and friends): import it in the handlers
# so that `dptrain --help` and the other commands stay fast.
ACCOUNTANTS = ("pld", "rdp")


def _add_mechanism_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampling-rate", "-q", type=float, required=True, metavar="Q",
                        help="Poisson sampling rate q = expected batch / dataset size, in (0, 1]")
    parser.add_argument("--delta", type=float, required=True, metavar="D",
                        help="target δ in (0, 1), e.g. below 1/N")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="pld",
                        help="PLD (tight, default) or RDP (faster, looser)")
    parser.add_argument("--dataset-size", type=int, metavar="N",
                        help="dataset size N in sequences (needed with --physical-batch-size)")
    parser.add_argument("--physical-batch-size", type=int, metavar="B_MAX",
                        help="fixed physical batch of truncated Poisson sampling")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `epsilon` and `calibrate`."""
    eps = subparsers.add_parser(
        "epsilon", parents=[common], help="ε spent by DP-SGD after T steps",
        description="ε of DP-SGD with Poisson sampling (q, σ) after T steps at δ, from "
                    "dp-accounting's PLD (default) or RDP accountant.")
    _add_mechanism_args(eps)
    eps.add_argument("--noise-multiplier", "-s", type=float, required=True, metavar="SIGMA",
                     help="noise multiplier σ > 0")
    eps.add_argument("--steps", "-T", type=int, required=True, metavar="T",
                     help="number of DP-SGD steps")
    eps.set_defaults(handler=_epsilon)

    cal = subparsers.add_parser(
        "calibrate", parents=[common], help="least σ, or most steps, for a target ε",
        description="Given --steps, the smallest noise multiplier whose ε ≤ --epsilon; given "
                    "--noise-multiplier, the largest number of steps whose ε ≤ --epsilon.")
    _add_mechanism_args(cal)
    cal.add_argument("--epsilon", type=float, required=True, metavar="E", help="target ε > 0")
    what = cal.add_mutually_exclusive_group(required=True)
    what.add_argument("--steps", "-T", type=int, metavar="T", help="calibrate σ for T steps")
    what.add_argument("--noise-multiplier", "-s", type=float, metavar="SIGMA",
                      help="calibrate the number of steps for this σ")
    cal.set_defaults(handler=_calibrate)


def _epsilon(args: argparse.Namespace) -> int:
    from dptrain.privacy import DpSgdMechanism, PrivacyParameterError, epsilon
    from dptrain.privacy._errors import check_steps

    started = time.perf_counter()
    try:
        check_steps(args.steps)  # ε after 0 steps is 0, but asking for it is a mistake here
        mechanism = DpSgdMechanism(
            sampling_rate=args.sampling_rate, noise_multiplier=args.noise_multiplier,
            delta=args.delta, accountant=args.accountant, dataset_size=args.dataset_size,
            physical_batch_size=args.physical_batch_size)
        value = epsilon(mechanism, args.steps)
    except PrivacyParameterError as error:
        fail(str(error), EXIT_INVALID)
    result: dict[str, Any] = {
        "epsilon": value, "delta": args.delta, "sampling_rate": args.sampling_rate,
        "noise_multiplier": args.noise_multiplier, "steps": args.steps,
        "accountant": args.accountant, "seconds": round(time.perf_counter() - started, 4)}
    emit(args, result, lambda r: f"ε = {r['epsilon']:.4f} (δ = {r['delta']:g}, "
                                 f"{r['accountant'].upper()}, T = {r['steps']}, "
                                 f"q = {r['sampling_rate']:g}, σ = {r['noise_multiplier']:g})")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from dptrain.privacy import PrivacyParameterError, calibrate_noise_multiplier, calibrate_steps

    common = {"epsilon": args.epsilon, "delta": args.delta, "sampling_rate": args.sampling_rate,
              "accountant": args.accountant, "dataset_size": args.dataset_size,
              "physical_batch_size": args.physical_batch_size}
    try:
        if args.steps is not None:
            sigma = calibrate_noise_multiplier(steps=args.steps, **common)
            result: dict[str, Any] = {**common, "steps": args.steps, "noise_multiplier": sigma}
            text = (f"σ = {sigma:.4f} is the least noise with ε ≤ {args.epsilon:g} in "
                    f"{args.steps} steps")
        else:
            steps = calibrate_steps(noise_multiplier=args.noise_multiplier, **common)
            result = {**common, "noise_multiplier": args.noise_multiplier, "steps": steps}
            text = (f"T = {steps} is the most steps with ε ≤ {args.epsilon:g} at "
                    f"σ = {args.noise_multiplier:g}")
    except PrivacyParameterError as error:
        fail(str(error), EXIT_INVALID)
    emit(args, result, lambda _: text)
    return 0
