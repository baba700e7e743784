"""The studies of the research plan, by name, in the order a full run takes them.

Modules are imported lazily so that one study's import error cannot stop the others.
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from .base import Study

#: name -> module under attention_proto.studies; each module defines STUDY (a Study instance)
STUDY_MODULES: Dict[str, str] = {
    "ceilings": "ceilings",       # the hardware and the peers, before our kernels
    "flash": "flash",             # study 1: dense forward (+ backward, varlen)
    "stitching": "stitching",     # study 2: composing modifiers
    "paged": "paged",             # study 3: paged decode
    "constants": "constants",     # study 4: specialization and compile cost
    "codegen": "codegen",         # study 5: do the Python paths use HGMMA?
    "linear": "linear",           # study 6: chunked linear attention
    "modifiers": "modifiers",     # study 7: RoPE / ALiBi / GQA / softcap / window costs
    "integration": "integration", # study 8: torch.library and transformers
    "reliability": "reliability", # GPU fuzz + compute-sanitizer outputs, ingested (measures nothing itself)
}


def known_studies() -> List[str]:
    return list(STUDY_MODULES)


class UnknownStudy(ValueError):
    pass


def load_study(name: str) -> Study:
    if name not in STUDY_MODULES:
        raise UnknownStudy(f"unknown study {name!r}; known studies: {', '.join(STUDY_MODULES)}")
    mod = importlib.import_module(f"{__name__}.{STUDY_MODULES[name]}")
    return mod.STUDY
