"""The `maft` command line."""

import subprocess
import sys

from maft.cli import main


def test_ipclip_example_prints_a_similarity_matrix(capsys):
    assert main(["ipclip-example"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "embeddings (4, 32)" in lines[0]
    matrix = [[float(value) for value in line.split()[1:]] for line in lines[3:7]]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert all(abs(matrix[index][index] - 1.0) < 1e-3 for index in range(4))
    # Different quadrants of a four-colour image give different embeddings.
    assert all(matrix[row][column] < 0.999 for row in range(4) for column in range(4) if row != column)


def test_console_script_rejects_unknown_commands():
    result = subprocess.run([sys.executable, "-m", "maft.cli", "no-such-command"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
