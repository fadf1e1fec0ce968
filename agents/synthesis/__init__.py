"""Teacher-trajectory synthesis (IVT Sec. 3.2): ``python -m agents.synthesis --config synthesize_cpu.yaml``.

It sits above the policies it drives (a student policy answers step 0; a geometric or VLM teacher writes the
reasoning): :mod:`agents.synthesis.synthesizer` is the pipeline, :mod:`agents.synthesis.cli` the command and its
output folder, :mod:`agents.synthesis.vlm_reasoner` the teacher VLM. ``python -m rollouts.synthesize`` still works
(the command's old name).
"""

from agents.synthesis.cli import main, read_jsonl, run, summarize, write_images
from agents.synthesis.synthesizer import STAGES, SynthesizeConfig, Synthesizer, dataset_kwargs, load_env_dataset, make_env

__all__ = ["STAGES", "SynthesizeConfig", "Synthesizer", "dataset_kwargs", "load_env_dataset", "main", "make_env",
           "read_jsonl", "run", "summarize", "write_images"]
