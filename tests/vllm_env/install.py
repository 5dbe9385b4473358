"""Test tooling: put ``mmcache_torchvision_shim`` on this interpreter's path for every process
(vLLM spawns its engines), through a ``.pth`` file in site-packages. ``python tests/vllm_env/install.py``;
``--remove`` takes it away. See the shim's docstring for why; never needed with a CPU torchvision."""

import pathlib
import sys
import sysconfig

PTH = pathlib.Path(sysconfig.get_paths()["purelib"]) / "mmcache_test_torchvision_shim.pth"


def main() -> None:
    if "--remove" in sys.argv:
        PTH.unlink(missing_ok=True)
        print(f"removed {PTH}")
        return
    here = pathlib.Path(__file__).resolve().parent
    PTH.write_text(f"{here}\nimport mmcache_torchvision_shim\n")
    print(f"wrote {PTH}")


if __name__ == "__main__":
    main()
