"""The preamble of a child interpreter that must run an export without the model code: importing flax, fastserve's
models, core or export writer, optax or orbax raises there (tests/test_export.py, tests/test_forward_export.py)."""
import textwrap

BLOCKED = ("flax", "fastserve.models", "fastserve.core", "fastserve.artifacts.writer", "optax", "orbax")

WITHOUT_MODEL_CODE = textwrap.dedent(f"""
    import importlib.abc, json, sys
    BLOCKED = {BLOCKED!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is blocked in this process")
            return None

    sys.meta_path.insert(0, Block())
""")
