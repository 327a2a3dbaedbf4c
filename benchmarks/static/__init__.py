"""Static GPU-readiness check: every kernel pacofr can launch, compiled ahead of time without a GPU.

    python -m benchmarks.static                       # table of every Triton variant + pacofr._C, sm_80 and sm_90
    python -m benchmarks.static --check --json OUT.json --markdown OUT.md   # and exit 1 on a violation

How the variants are found (one source of truth: the launch code itself):

1. :mod:`.workloads` makes the op calls a user makes: the benchmark families' shapes
   (``benchmarks/bench_*.py``, quick tier) and one training step of every model preset
   (``pacofr.models.ModelConfig.preset``), both phases, codebook maintenance included.
2. :mod:`.launches` records, instead of running, every Triton kernel launch those calls make
   (``JITFunction.run`` is intercepted; the launchers in ``pacofr/ops`` choose tiles, warps and
   stages exactly as they would on a GPU).
3. :mod:`.triton_aot` binds each launch the way Triton's runtime does and compiles it for sm_80
   and sm_90 (``triton.compile`` with a ``GPUTarget``), then reads registers, stack, shared
   memory and the tensor-core instructions from the cubin with the ``cuobjdump`` Triton ships.
4. :mod:`.cuda_sass` reads the same from the SASS of the built ``pacofr._C``.
5. :mod:`.policy` applies the rules CI enforces and renders the table.
6. :mod:`.cost_budget` (with :mod:`.sass_flow` and :mod:`.cost_model`): an ESTIMATE per kernel of the
   headline rows (issue 27), read from the same compiled code: per tile the MMA instructions and their
   cycles, the other instructions per scheduler, barriers, bytes from L2 and HBM, occupancy, the bound
   each implies and the estimated time beside the floor (``cost_budget`` in the JSON,
   ``--budget-markdown``; docs/kernels/cost-budget.md).
"""
