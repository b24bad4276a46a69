"""Trace loading: the bundled ShareGPT trace and clear errors for bad files."""

import pytest

from kvswitch.trace import TraceError, default_trace_path, load_trace, sample

HEADER = "conversation_id,turn,new_input_tokens,output_tokens"


def write(tmp_path, text):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_bundled_trace_matches_its_provenance_statistics():
    convs = load_trace()
    assert default_trace_path().name == "sharegpt4_multiturn_turns_llama2_tok.csv"
    assert len(convs) == 5678
    assert sum(len(c.turns) for c in convs) == 30731
    assert max(max(t.output_tokens for t in c.turns) for c in convs) == 1024
    assert all(c.arrival_s is None for c in convs)


def test_reads_interleaved_rows_and_arrivals(tmp_path):
    path = write(tmp_path, "conversation_id,turn,new_input_tokens,output_tokens,arrival_s,x\n"
                           "a,0,10,5,0.5,?\nb,0,3,4,1.0,?\na,1,2,7,,?\n")
    a, b = load_trace(path)
    assert a.conversation_id == "a" and a.arrival_s == 0.5
    assert [(t.new_input_tokens, t.output_tokens) for t in a.turns] == [(10, 5), (2, 7)]
    assert a.total_tokens == 24 and b.arrival_s == 1.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("conversation_id,turn,output_tokens\na,0,1\n", "missing column.*new_input_tokens"),
        (f"{HEADER}\na,0,ten,5\n", r"row 2, column 'new_input_tokens'.*'ten'"),
        (f"{HEADER}\na,0,1,5\na,0,1,5\n", r"row 3, column 'turn'.*expects turn 1, got 0"),
        (f"{HEADER}\na,0,1,5\na,1,1,-5\n", r"row 3, column 'output_tokens'.*'-5'"),
        (f"{HEADER}\na,1,1,5\n", r"row 2, column 'turn'.*expects turn 0, got 1"),
        (f"{HEADER}\n,0,1,5\n", r"row 2, column 'conversation_id'"),
        (f"{HEADER}\na,0,0,0\n", r"row 2: a turn with no tokens"),
        (f"{HEADER},arrival_s\na,0,1,5,soon\n", r"row 2, column 'arrival_s'.*'soon'"),
        (f"{HEADER},arrival_s\na,0,1,5,nan\n", r"row 2, column 'arrival_s'"),
        (f"{HEADER}\n", "no turns"),
        ("", "missing column"),
    ],
)
def test_bad_files_name_row_and_column(tmp_path, text, match):
    with pytest.raises(TraceError, match=match):
        load_trace(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="cannot open"):
        load_trace(tmp_path / "nope.csv")


def test_sample_is_seeded_and_bounded():
    convs = load_trace()
    assert sample(convs, 10, seed=1) == sample(convs, 10, seed=1)
    assert sample(convs, 10, seed=1) != sample(convs, 10, seed=2)
    assert len(sample(convs[:5], 10, seed=0)) == 5
