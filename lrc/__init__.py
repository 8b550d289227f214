"""lrc: make LLM checkpoints smaller by low-rank factorization.

    import lrc
    result = lrc.compress("smollm2-135m", lrc.CompressionConfig(budget=0.3, calib="wiki.valid.tokens"), "out/")
    model = lrc.load("out/")
    print(lrc.evaluate(model, data="wiki.test.raw"))
"""

__version__ = "0.1.0"

from .config import CompressionConfig  # noqa: E402
from .errors import LrcError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import export_dense  # noqa: E402
from .forms import LowRankLinear  # noqa: E402
from .io.hf_integration import register as _register_with_transformers  # noqa: E402
from .pipeline import CompressionResult, compress  # noqa: E402
from .sources import load_model as load  # noqa: E402

_register_with_transformers()

__all__ = [
    "CompressionConfig", "CompressionResult", "LowRankLinear", "LrcError", "compress", "evaluate", "export_dense", "load", "__version__",
]
