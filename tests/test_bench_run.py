"""benchmarks/run.py: what results.json records about the machine its figures came from."""

from benchmarks.run import CPU_FLAGS, machine


def test_machine_records_cpu_extensions_and_package_versions():
    info = machine()
    assert set(info["cpu_flags"]) <= set(CPU_FLAGS)
    assert info["versions"]["torch"] == info["torch"]  # the installed distribution is the imported one
    assert {"numpy", "scipy", "pytorch_lightning"} <= set(info["versions"])
