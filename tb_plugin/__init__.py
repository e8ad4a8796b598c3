"""moe-trace for TensorBoard: an offline MoE dashboard ("MoE" tab) over moe_trace Kineto traces.

Registered through the `tensorboard_plugins` entry point as `tb_plugin.plugin:MoeTracePlugin`;
`tensorboard --logdir RUNS` shows it once `pip install moe-trace[tensorboard]` is done.
"""

__all__ = ["MoeTracePlugin"]


def __getattr__(name):  # keep `import tb_plugin` free of the tensorboard import
    if name == "MoeTracePlugin":
        from .plugin import MoeTracePlugin

        return MoeTracePlugin
    raise AttributeError(name)
