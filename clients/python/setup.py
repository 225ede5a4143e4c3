"""Generates the gRPC stubs from the repository's proto/ while building, so
they are never committed twice by hand."""
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = (HERE / ".." / ".." / "proto").resolve()


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        out = pathlib.Path(self.build_lib)
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        status = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_ROOT / "idemd" / "v1" / "idempotency.proto"),
            str(PROTO_ROOT / "idemd" / "v1" / "admin.proto"),
        ])
        if status != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT}")
        for package in (out / "idemd", out / "idemd" / "v1"):
            (package / "__init__.py").touch()


setup(cmdclass={"build_py": BuildWithStubs})
