"""The cuda backend: CUDA C++ from Jinja2 and CuTe templates, compiled by NVRTC into SASS cubins
(no GPU needed to compile or to check them), run through the CUDA driver API."""
