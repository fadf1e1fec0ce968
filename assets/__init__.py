"""Shipped model folders (``tiny-ivt-bc``: the behaviour-cloned tiny Qwen3-VL that GRPO's CPU default starts from;
``tiny-ivt-grpo``: the best/ policy of that default GRPO run; ``tiny-ivt-adaptive``: tiny-ivt-grpo fine-tuned to
write a stop token after a box that fits, issue 14),
installed with the package so that ``init_from: assets/tiny-ivt-bc`` resolves from a non-editable install too
(agents.grpo.setup.resolve_init_from)."""
