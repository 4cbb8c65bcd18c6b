"""What a compiled program costs per device: peak memory and matrix-product FLOPs with loops counted in full.

XLA's own `compiled.cost_analysis()` counts the body of a `while` loop once, so for a model whose layers run
under `jax.lax.scan` (every jaxalign model) it undercounts by about the number of layers. This module reads the
optimised HLO text instead and walks its call graph from the entry computation: a `while` contributes its
body times its known trip count, a fusion or call contributes the computation it calls, and a `dot`
contributes 2 x (output elements) x (contracted elements). Element-wise work is not counted: for transformer
training steps the matrix products are all but a fraction of a percent of the arithmetic, and they are what
"model FLOPs" estimates (2 N T) describe.

The program must be compiled for its devices (`jax.jit(f).lower(*abstract_args).compile()`); under SPMD the
HLO is one device's program, so the counts are per device.

Public API:
  ProgramCost(peak_bytes, argument_bytes, temp_bytes, output_bytes, alias_bytes, matmul_flops)
  program_cost(compiled) -> ProgramCost
  matmul_flops(hlo_text) -> float
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_PARAMETER = re.compile(r"([\w.\-]+):\s*([a-z]\w*\[[\d,]*\])")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:calls|to_apply)=%([\w.\-]+)")
_BODY = re.compile(r"body=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """One device's share of a compiled program.

    Attributes:
      peak_bytes: argument + temp bytes (the inputs that must be resident plus XLA's scratch), the figure to
        compare with a device's memory. Outputs alias donated arguments in a training step, so they add nothing.
      argument_bytes, temp_bytes, output_bytes, alias_bytes: `compiled.memory_analysis()`'s fields.
      matmul_flops: FLOPs of every matrix product, loop bodies times their trip counts.
    """

    peak_bytes: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    matmul_flops: float


def _dims(shape_text: str) -> tuple[int, ...] | None:
    match = _SHAPE.match(shape_text.strip())
    if match is None:
        return None
    return tuple(int(d) for d in match.group(1).split(",") if d)


def _product(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _split_computations(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, dict[str, tuple]], str]:
    """{computation: its instruction lines}, {computation: {value name: dims}} and the entry's name."""
    bodies: dict[str, list[str]] = {}
    shapes: dict[str, dict[str, tuple]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            if header.group(1):
                entry = current
            bodies[current] = []
            shapes[current] = {name: _dims(shape) for name, shape in _PARAMETER.findall(header.group(3))}
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            bodies[current].append(line)
            shapes[current][instruction.group(2)] = _dims(instruction.group(3))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text() of a compiled program)")
    return bodies, shapes, entry


def _dot_flops(line: str, instruction: re.Match, shapes: dict[str, tuple]) -> float:
    output = _dims(instruction.group(3))
    operands = re.findall(r"%([\w.\-]+)", instruction.group(5).split(")")[0])
    contracting = _CONTRACTING.search(line)
    if output is None or not operands or contracting is None:
        return 0.0
    lhs = shapes.get(operands[0])
    if lhs is None:
        return 0.0
    contracted = _product(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    return 2.0 * _product(output) * contracted


def matmul_flops(hlo_text: str) -> float:
    """FLOPs of every `dot` in an optimised HLO module, each loop body counted as often as it runs.

    A loop without a known trip count (a `while_loop` whose length depends on data) is counted once, like
    XLA's own analysis does.
    """
    bodies, shapes, entry = _split_computations(hlo_text)
    memo: dict[str, float] = {}

    def flops_of(name: str, stack: tuple[str, ...] = ()) -> float:
        if name in memo:
            return memo[name]
        if name in stack or name not in bodies:
            return 0.0
        total = 0.0
        for line in bodies[name]:
            instruction = _INSTRUCTION.match(line)
            opcode = instruction.group(4)
            if opcode == "dot":
                total += _dot_flops(line, instruction, shapes[name])
            elif opcode == "while":
                trips = _TRIP_COUNT.search(line)
                body = _BODY.search(line)
                if body:
                    total += (int(trips.group(1)) if trips else 1) * flops_of(body.group(1), stack + (name,))
            elif opcode == "conditional":
                branches = _BRANCHES.search(line)
                if branches:
                    names = re.findall(r"%([\w.\-]+)", branches.group(1))
                    total += max((flops_of(b, stack + (name,)) for b in names), default=0.0)
            else:
                for called in _CALLS.findall(line):
                    total += flops_of(called, stack + (name,))
        memo[name] = total
        return total

    return flops_of(entry)


def program_cost(compiled: Any) -> ProgramCost:
    """Memory (from `memory_analysis()`) and loop-aware matmul FLOPs of one device's compiled program."""
    memory = compiled.memory_analysis()
    argument = int(memory.argument_size_in_bytes)
    temp = int(memory.temp_size_in_bytes)
    return ProgramCost(peak_bytes=argument + temp, argument_bytes=argument, temp_bytes=temp,
                       output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
                       matmul_flops=matmul_flops(compiled.as_text()))
