#!/usr/bin/env python3
# SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
# SPDX-License-Identifier: Apache-2.0
"""Registers, stack and spills per kernel from ptxas's verbose output (nvcc --resource-usage).

    python3 plugins/contrib_topk/ptxas_report.py build.log [--no-spill contrib_scores_kernel]

Prints one line per (architecture, kernel) and exits 1 when a kernel whose name contains a
--no-spill pattern spills (spill stores or loads > 0), or when the log holds no such kernel at all
(a build that printed nothing would otherwise pass). `make cuda-check` runs it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


@dataclass
class KernelUsage:
    mangled: str
    arch: str
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse(log: str) -> list[KernelUsage]:
    """Kernels in the order ptxas compiled them; the properties lines follow each entry line."""
    kernels: list[KernelUsage] = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(KernelUsage(mangled=m.group(1), arch=m.group(2)))
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].stack, kernels[-1].spill_stores, kernels[-1].spill_loads = map(int, m.groups())
        elif kernels and (m := _USED.search(line)):
            kernels[-1].registers = int(m.group(1))
    _demangle(kernels)
    return kernels


def _demangle(kernels: list[KernelUsage]) -> None:
    names = [k.mangled for k in kernels]
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        done = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
        if done.returncode == 0 and len(done.stdout.splitlines()) == len(names):
            names = done.stdout.splitlines()
    for kernel, name in zip(kernels, names):
        # Short names: no anonymous namespace, return type or parameter list (templates stay).
        name = re.sub(r"\(anonymous namespace\)::", "", name)
        name = re.sub(r"^void ", "", name)
        kernel.name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="compiler output holding ptxas -v lines")
    parser.add_argument("--no-spill", action="append", default=[], metavar="PATTERN",
                        help="fail when a kernel whose demangled name contains PATTERN spills (repeatable)")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        kernels = parse(f.read())
    width = max((len(k.name) for k in kernels), default=10)
    print(f"{'arch':<7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for k in kernels:
        print(f"{k.arch:<7} {k.registers:>4} {k.stack:>5} {k.spill_stores:>8} {k.spill_loads:>8}  {k.name:<{width}}")
    status = 0
    for pattern in args.no_spill:
        matching = [k for k in kernels if pattern in k.name]
        if not matching:
            print(f"FAIL: no kernel matching {pattern!r} in {args.log} (was it compiled with --resource-usage?)",
                  file=sys.stderr)
            status = 1
        for k in matching:
            if k.spills:
                print(f"FAIL: {k.name} spills on {k.arch}: {k.spill_stores} bytes stored, {k.spill_loads} loaded",
                      file=sys.stderr)
                status = 1
    if status == 0 and args.no_spill:
        print(f"OK: no spills in {', '.join(args.no_spill)} ({len(kernels)} kernel builds reported)")
    return status


if __name__ == "__main__":
    sys.exit(main())
