"""examples/train_code_sdpo.py trains: one SDPO step of a tiny model with the code reward; the reprompt it prints
for a failing reply carries that reply's feedback."""

import os
import runpy
import string
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_code_sdpo.py"


def _visible(text: str) -> str:
    """What the tiny character tokenizer keeps of ``text`` when decoding: its characters but whitespace."""
    from adapters_tiny import CHARACTERS

    kept = set(CHARACTERS) - set(string.whitespace)
    return "".join(character for character in text if character in kept)


@pytest.mark.slow
def test_one_step_prints_a_failing_reply_its_feedback_and_the_reprompt(tmp_path, capsys):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from adapters_tiny import make_model, make_tokenizer, save_model

    tokenizer = make_tokenizer()
    model_dir = save_model(tmp_path / "tiny", tokenizer, make_model(len(tokenizer)))
    example = runpy.run_path(str(EXAMPLE), run_name="example")
    summary = example["main"](
        ["--model", model_dir, "--steps", "1", "--max-completion-length", "16", "--output-dir", str(tmp_path / "out")]
    )
    printed = capsys.readouterr().out

    assert summary["steps"] == 1
    assert len(summary["mean_rewards"]) == 1 and 0.0 <= summary["mean_rewards"][0] <= 1.0
    shown = summary["example"]
    # A random model writes no working code: every reply fails, and the first is shown with its feedback.
    assert shown["feedback"].startswith(("No Python code found", "The code does not compile", "The code failed"))
    assert f"--- a failing reply ---\n{shown['program']}\n--- its feedback ---\n{shown['feedback']}\n" in printed
    teacher_prompt = _visible(shown["teacher_prompt"])
    assert _visible("The following is feedback from your unsuccessful earlier attempt:") in teacher_prompt
    assert _visible(shown["feedback"]) in teacher_prompt
    assert _visible("Correctly solve the original question.") in teacher_prompt
