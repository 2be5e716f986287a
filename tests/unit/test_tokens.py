"""Token alignment of the edit plans (attention/core/tokens.py), on token ids: no tokenizer, no ComfyUI."""
import pytest

from inversion_chain.attention.core.tokens import align_tokens

pytestmark = pytest.mark.fast


def test_align_tokens_keeps_common_tokens_in_order():
    assert align_tokens([1, 2, 3, 4], [1, 9, 2, 3, 4]) == [0, -1, 1, 2, 3]
    assert align_tokens([1, 2, 3, 4], [1, 3, 4]) == [0, 2, 3]
    assert align_tokens([1, 2, 3], [1, 7, 3]) == [0, -1, 2]          # a substitution is a new token
    assert align_tokens([5, 5, 6], [5, 6, 5, 6]) == [0, -1, 1, 2]
