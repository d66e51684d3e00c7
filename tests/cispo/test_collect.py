"""The collection path's prompt encoding: the tokenizer's own special tokens, or its chat template."""
import pytest

from cispo.collect import Collector, encode_prompt, pass_at_k
from cispo.config import RecipeError, load_recipe
from cispo.data import Prompt
from rollout.model import build_char_tokenizer, load_tokenizer
from tests.conftest import REPO

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_prompts_encode_as_the_saved_tokenizer_encodes_them(tmp_path):
    tok = build_char_tokenizer("0123456789+=<>abcdefghijklmnopqrstuvwxyz")
    plain = encode_prompt(tok, "1+2=")
    assert plain == [tok.bos_token_id] + tok("1+2=", add_special_tokens=False)["input_ids"]
    with pytest.raises(RecipeError, match="no chat template"):
        encode_prompt(tok, "1+2=", chat_template=True)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path)
    saved = load_tokenizer(tmp_path)
    chat = encode_prompt(saved, "1+2=", chat_template=True)
    assert saved.decode(chat) == "<user>1+2=<assistant>"
    assert encode_prompt(saved, "1+2=") == plain  # the plain route a user of the export takes

    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["model.chat_template=true"])
    assert Collector(recipe, saved, None, None).encode(Prompt("1+2=", "3")) == chat


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 3, 3) == 1.0  # fewer failures than tries: some try passes
