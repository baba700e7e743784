"""Codegen quality: what the compiled kernels of each Python path to the GPU look like in SASS.

- :mod:`.sass`: parse ``cuobjdump -sass`` text (instruction classes, loops, resources, occupancy);
- :mod:`.collect`: obtain cubins (our kernels from ``KERNEL_CACHE``; Inductor / FlexAttention
  kernels from a fresh Triton cache; other DSLs) and disassemble them;
- :mod:`.report`: the ``codegen.json`` export and the report's table, built from measurement rows.
"""
