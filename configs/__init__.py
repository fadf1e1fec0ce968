"""The project's YAML settings (the paper's and the CPU defaults), installed with the package so that
``--config grpo_cpu.yaml`` resolves from any folder and from a non-editable install (agents.common.config.CONFIG_DIR)."""
