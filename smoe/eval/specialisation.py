"""The specialisation analyses in the report: every MoE's final checkpoint of every seed (smoe.eval.analysis), each
finding rendered by its own type (smoe.eval.findings.FINDINGS) from the per-seed results."""

from __future__ import annotations

from smoe.eval.document import Block, Heading, Paragraph
from smoe.eval.findings import FINDINGS, Runs
from smoe.eval.stats import spread_note


def specialisation(runs: Runs, seeds: int) -> list[Block]:
    """The findings of every seed, as mean ± interval over seeds; top tokens and domain affinity are seed 0's, as
    they do not average across runs whose experts differ."""
    doc: list[Block] = [Heading(2, "Specialisation (validation set)"),
                        Paragraph(f"Each MoE architecture's final checkpoint of every seed, on the part of the "
                                  f"suite's fixed validation set the periodic evaluations read. Everything here is "
                                  f"exploratory: intervals are uncorrected 95% ones, and only the pre-registered "
                                  f"contrasts above are the verdict. {spread_note(seeds)}")]
    for finding in FINDINGS:
        doc += finding.blocks(runs, seeds)
    return doc
