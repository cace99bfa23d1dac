"""Every tunable number of relprop in one place (STUMPY's config.py pattern).

Tests patch these (``monkeypatch.setattr(relprop._config, "THREADS_PER_BLOCK", 8)``)
rather than passing hidden keyword arguments.
"""

#: Fast-math flags for every ``@njit`` kernel: STUMPY's set, i.e. *without* ``nnan``
#: and ``ninf``, so NaN/Inf propagate and ``np.isnan`` still works inside kernels.
#: A plain ``set``: Numba rejects a frozenset ("Expected fastmath option(s) to be either a bool, dict or set").
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: Numba's on-disk cache: a second process does not recompile.
NUMBA_CACHE = True

#: CUDA threads per block for 1-D grid-stride launches (tests patch it down to 8).
THREADS_PER_BLOCK = 128

#: Upper bound on the blocks of one CUDA launch; every kernel is a grid-stride loop, so a
#: larger problem loops instead of launching more blocks (tests patch it down to exercise that).
CUDA_MAX_BLOCKS = 8192

#: Upper bound on the scratch of one chunk of a CUDA convolution or pattern-sum pass (its column matrix), in bytes.
CUDA_SCRATCH_BYTES = 256 * 1024 * 1024

#: Default ε of LRP-ε and default stabiliser of every other rule (docs/conventions.md).
DEFAULT_EPSILON = 1e-6
DEFAULT_STABILIZER = 1e-6

#: Upper bound on the im2col buffer of one chunk of a convolution, in bytes.  Chunks of
#: samples are sized so that their column matrix stays near the cache.  (CPU: 16 MiB, not
#: less: every chunk is a few BLAS calls, and on a loaded machine each call's thread
#: synchronisation costs far more than the cache misses of a larger chunk.)
CONV_CHUNK_BYTES = 16 * 1024 * 1024

#: The CPU input-VJP of a stride-1 convolution uses the row-shift GEMMs (whose result has C
#: rows) when the layer has at least this many input channels C; below it, im2col's GEMM
#: (C*kh*kw result rows) and a col2im feed BLAS better (3 channels: 3x faster).
CONV_VJP_ROWS_MIN_CHANNELS = 8

#: Narrow stride-1 CPU convolutions (at most CONV_LANES_MAX_CHANNELS input and output channels:
#: LeNet's 1->6 and 6->16 5x5 layers, and their input-VJPs) run direct, the batch laid out as the
#: fastest-varying index in blocks of up to CONV_LANES samples whose scratch stays within
#: CONV_LANES_BYTES (relprop.kernels.cpu.conv2d, "lanes"): every tap is then one long vector
#: multiply-add, where the row-shift GEMMs with 1-16 result rows feed BLAS badly.  Measured on an
#: idle 2-core machine, two threads, interleaved, LeNet-5's layers at batch 256: forward 1.1-1.25x,
#: input-VJP 1.2-2.4x the GEMM paths; on CIFAR-VGG's 3->64 first layer the VJP ran 0.76x, hence
#: the bound on both channel counts.  0: never.
CONV_LANES = 64
CONV_LANES_BYTES = 512 * 1024
CONV_LANES_MAX_CHANNELS = 16
#: A chain of lanes layers, each a conv + ReLU + 2x2 max-pool triple (LeNet-5's two), runs each block
#: of samples through every stage in one pass (relprop.kernels.cpu.conv2d, _forward_lanes_chain); a
#: block's scratch for all the stages stays within this (L2-sized: LeNet-5 then gets 64 lanes, 1.6
#: MB; its forward ran 1.02-1.05x slower with 32 lanes, 1.15-1.19x with 16, alone and right after a
#: PyTorch forward).  GRAPH_CHAINS = False: the graph's forward runs the triples one at a time.
CONV_LANES_CHAIN_BYTES = 2 * 1024 * 1024
#: An LRP backward through a lanes layer (relprop.kernels.cpu.conv2d.conv2d_relevance) divides R by stab(z)
#: on its way into lanes only where R's rows are at least this wide: each row's quotient is a short loop
#: of its own, and on LeNet-5's 8-wide 16 -> 6 layer that ran 1.04-1.05x slower than one pass over R.
CONV_LANES_DIVIDE_MIN_WIDTH = 32
GRAPH_CHAINS = True

#: Default bound on how many modified inputs go through the net at once
#: (input-level methods: SmoothGrad, Integrated Gradients, occlusion, perturbation).
DEFAULT_BATCH_SIZE = 64

#: The CPU elementwise and pooling kernels run parallel (Numba prange) only on arrays of at
#: least this many elements; smaller ones run serially (relprop.kernels.cpu._threads.parallel_above):
#: on a shared machine a parallel loop's wait for its threads costs more than a small pass, and
#: Numba's OpenMP workers then compete with the convolutions' chunk threads.  Measured on an idle
#: 2-core machine: CIFAR-VGG b64 forward 111 ms with its 4M-element passes parallel, 85 ms serial;
#: VGG-16 b4 (13M-element passes) level or better parallel.
PARALLEL_MIN_ELEMENTS = 1 << 23


#: Threads that share out the chunks of one CPU convolution, each with single-threaded BLAS
#: (relprop.kernels.cpu._chunks); None: the CPUs this process may run on.  1: the chunks run
#: in the calling thread and BLAS uses its own threads (as the user set them).
CONV_THREADS = None

#: A convolution's batch of fewer samples is not cut into extra chunks to share out to the threads
#: (relprop.kernels.cpu.conv2d._samples_per_chunk): small GEMMs lose more than the threads gain on
#: an idle machine.
CONV_SPLIT_MIN_SAMPLES = 32

#: A convolution that runs as a single chunk (such a batch, one image) on several threads shares the
#: columns of its GEMMs out to the threads (relprop.kernels.cpu._chunks.share) when it has at least this
#: many multiply-adds; below, its chunk runs on the calling thread alone.  Either way BLAS is held to
#: one thread (its workers would keep spinning for ~0.1 s after the call).  Measured on an idle 2-core
#: machine, one image, the direct path: shared 1.2-1.65x faster than one thread from 1.2e8
#: multiply-adds (32-512 channels), no faster at 3.8e7 (0.7 ms), 3.5x slower at 1.8e6 (handing a block
#: to a pool thread costs ~0.1-0.2 ms there).
CONV_SHARE_MIN_MACS = 1 << 26

#: A CPU dense layer's batch of at least twice this many rows is cut into one block of rows per
#: thread, each block one single-threaded GEMM (relprop.kernels.cpu.dense); smaller batches are
#: one GEMM with BLAS's own threads.  Not BLAS's threads for large batches: they keep spinning
#: after the GEMM and take the cores from the convolutions that follow (measured on an idle
#: 2-core machine: CIFAR-VGG b64 gradient 182 ms with blocks, 277 ms with one threaded GEMM,
#: although the dense layer alone ran 2.2 ms against 2.9 ms).
DENSE_MIN_ROWS = 16

#: ... but only while the weight matrix is at most this many bytes: every row block reads all of
#: W, so for a larger W one block of columns per thread (each reading its half of W once, with
#: every row) ran faster, measured alternating on the 2-core machine, medians: 4096 -> 512 at
#: batch 32-64 forward 1.19-1.74x, VJP 1.52-1.56x; 4096 -> 4096 at batch 32-512 1.06-1.45x; a
#: 512 x 512 W (1 MiB) level either way (0.80-1.08x), so it keeps its row blocks.
DENSE_ROW_BLOCKS_MAX_WEIGHT_BYTES = 4 * 1024 * 1024

#: ... and a dense GEMM of fewer multiply-adds than this runs whole on the calling thread (BLAS
#: held to one thread): handing half of it to a second thread costs more than it saves (LeNet-5's
#: 256x256 -> 120 layer: 0.16 ms on one thread, 0.28 ms shared out to two).
DENSE_MIN_THREADED_MACS = 1 << 24

#: A CPU dense layer's forward for at most this many samples, and its VJP for 2 to
#: DENSE_STREAM_VJP_MAX_ROWS, run by relprop's own kernels where the (C-contiguous) weight matrix
#: holds at least DENSE_STREAM_MIN_WEIGHT_BYTES: one pass over W, each element loaded once for every
#: sample (relprop.kernels.cpu.dense).  BLAS's GEMM for so few rows reads W at a third of the memory's
#: rate.  Measured alternating on an idle 2-core machine against the BLAS blocks, forward: VGG-16's
#: 25088 -> 4096 at batch 2-8 1.7-2.3x, 4096 -> 4096 2.3-2.8x, 4096 -> 1000 2.2-4.4x; batch 16
#: 1.3-1.9x, batch 32 0.8-1.3x.  VJP: batch 2 2.0-2.9x, 4 1.3-2.1x, 8 1.0-1.6x, 16 0.7-0.85x; batch 1
#: 0.8-1.1x (BLAS's matrix-vector product already reads at the memory's rate).  A 1 MB W at batch 1-2
#: ran at half BLAS's speed (0.02 ms).
DENSE_STREAM_MAX_ROWS = 16
DENSE_STREAM_VJP_MAX_ROWS = 8
DENSE_STREAM_MIN_WEIGHT_BYTES = 4 * 1024 * 1024

#: 3x3 stride-1 CPU convolutions (forward and input-VJP) by Winograd F(4x4, 3x3)
#: (relprop.kernels.cpu.winograd): 4x fewer multiplies, float32 results within ~1e-5 of the
#: output's range of the direct sum.  False: always the direct convolution.
WINOGRAD = True

#: ... but only for layers with at least this many input and output channels, and at least
#: WINOGRAD_MIN_WORK = tiles x C x K (the multiply-adds of one of the 36 GEMMs; a tile is a 4x4
#: block of outputs of one sample).  Measured on an idle 2-core machine, two threads, filters
#: transformed once (cached): 1.3-2.6x faster than the direct path from 64 channels and 2^22
#: (CIFAR-VGG at batch 16 and 64, VGG-16 at batch 4, 512 channels at 14x14 included), but
#: 2-4x slower with 3-32 channels.  Since small Winograd convolutions run on the calling thread
#: (WINOGRAD_THREADS_MIN_MACS), it pays down to a single tile (one image, layer by layer on one
#: thread: 64 -> 64 channels at 4x4 1.5x, 64 -> 128 at 16x16 1.8x, 128 -> 256 at 8x8 1.4x; 128-512
#: channels at 2x2-4x4, one tile, level): 2^12, the least work of a layer WINOGRAD_MIN_CHANNELS
#: wide (CIFAR-VGG b1 forward 1.10x, gradient 1.03x, ε+flat 1.04x against 2^18).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_WORK = 1 << 12

#: A Winograd convolution of fewer multiply-adds in its GEMMs than this (36 x tiles x C x K, summed
#: over its filter sets) runs on the calling thread alone, its chunks one after the other: a hand-off
#: to a pool thread costs ~0.1 ms, more than sharing out such a layer saves (one image, per layer
#: against one thread: 0.87-1.03x at 9.4e6, 0.91-1.17x at 1.9e7, 1.2-1.6x from 3.8e7).
WINOGRAD_THREADS_MIN_MACS = 1 << 24

#: A Winograd convolution with too few tiles for a chunk per thread shares its three phases out to the
#: threads (relprop.kernels.cpu.winograd._few_tiles) only from this many multiply-adds in its GEMMs
#: (counted as for WINOGRAD_THREADS_MIN_MACS); below, it is one chunk on the calling thread: each
#: phase's hand-off to a pool thread costs ~0.1 ms.  Measured per layer on an idle 2-core machine
#: against one thread: 0.71-0.86x at 1.9e7 (128 -> 128 channels at 16x16, two images; 256 -> 256 at
#: 8x8), 1.2-1.4x at 3.8e7.
WINOGRAD_FEW_TILES_MIN_MACS = 1 << 25

#: Bytes of Winograd filter transforms and other arrangements of the weights (and the weight copies
#: that validate them, relprop.kernels.cpu._derived) kept between calls, least recently used first
#: out; 0: derive them on every call.  A transform
#: is 4x its weights, one per direction (forward, input-VJP): VGG-16's 3x3 layers take 530 MB
#: for the gradient and 820 MB for z+ rules (the z+ weights W+ are a second set).
WINOGRAD_CACHE_BYTES = 1024 * 1024 * 1024

#: An LRP rule's modified weights (W⁺, W⁻, ...) are kept in that cache too, so that a new explainer gets the
#: same arrays (relprop.rules.core._term_weight): a convolution's always, a dense layer's up to this many
#: bytes of weights (VGG-16's 411 MB first dense layer, with its copy, would crowd out the transforms).
RULE_WEIGHTS_KEPT_MAX_BYTES = 64 * 1024 * 1024
#: ... and from this many bytes of weights on: smaller ones are formed on every call (an element-wise pass
#: over LeNet-5's 9.6 KB costs less than looking them up, whose check of the weights may wait for the
#: checker thread: LeNet-5 b1 ε+flat 0.8 ms kept, 0.4 ms formed afresh).
RULE_WEIGHTS_KEPT_MIN_BYTES = 64 * 1024

#: Check a net's cached weight arrangements (relprop.kernels.cpu._derived) on a thread of their own, ahead
#: of the calling thread, which then only takes their verdicts: the weights the previous forward or
#: explanation of the same net or explainer looked up, in that order.  The same checks; at CIFAR-VGG b1
#: they took a fifth of a forward on the calling thread.  False: each check on the calling thread.
#: Only for batches of at most WEIGHT_CHECKS_AHEAD_MAX_SAMPLES samples: larger ones keep every thread
#: busy, and the checker only takes a core from them.  Measured in alternating processes (ABBA) on an
#: idle 2-core machine: CIFAR-VGG b1 forward 1.06x, gradient 1.03x, ε+flat 1.13x; b4 1.03-1.08x; b16
#: 1.04-1.06x; VGG-16 b1 1.03-1.04x; but CIFAR-VGG b64 0.98-1.00x and VGG-16 b4 0.99-1.00x.
WEIGHT_CHECKS_AHEAD = True
WEIGHT_CHECKS_AHEAD_MAX_SAMPLES = 16

#: The CPU convolutions' other arrangements of the weights (the row-shift and im2col GEMMs' operands, the
#: flipped weights of an input-VJP in lanes) are kept between calls like the Winograd transforms, in the
#: same cache, for weights of at least this many bytes (below it, a copy costs less than the check).
CONV_TAPS_CACHE_MIN_BYTES = 64 * 1024

#: LRP sweeps have the traced forward compute, in the same kernel call as a convolution's own
#: forward, the modified forwards its rule reads from a itself (z+'s W+a + b+ behind a ReLU, the
#: gamma rule's, alpha-beta's two): the Winograd path transforms the input once for all of them
#: (CIFAR-VGG's 3x3 layers: the pair in 0.80 of the time of two calls; whole sweeps, alternating:
#: CIFAR-VGG b64 eps+flat 1.06-1.08x, alpha-beta 1.07x, VGG-16 b4 eps+flat 1.05x).  The trace then
#: holds those outputs until the rule takes them.  False: each rule runs its own.
TRACE_MODIFIED_FORWARDS = True

#: Sweeps whose rules read neither a ReLU's output nor the pre-activation before it, where a conv,
#: ReLU and 2x2 max-pool follow one another (the gradient-type sweeps, the LRP composites' pass-through
#: ReLU and winner-takes-all pool), have the trace run the triple as one kernel call that records the
#: pool's maxima and switches only (Graph.trace's ``pooled``): neither z nor the full-size relu(z) is
#: written, and the separate pool pass is gone.  False: the trace records every output.
TRACE_FUSED_POOLS = True

#: LRP sweeps run whole (down to the input, no per-layer relevances) divide by a conv's modified forward
#: above the max-pool of its conv, ReLU, 2x2 max-pool triple (rules.core.DivideBeforeUnpool): only the
#: pool's switches carry relevance, so the trace records z' = W'a + b' at the switches only (a quarter
#: of its writes) and the conv's backward reads no z'.  The same bits.  False: the plain rules.
LRP_DIVIDE_BEFORE_UNPOOL = True

#: Whole gradient-type sweeps hand the signal of a conv, ReLU, 2x2 max-pool triple down from above the
#: pool still pooled (its ReLU gated there, rules.signal.GateBeforeUnpool), and the conv's transposed
#: pass unpools it as it reads (rules.signal.VjpOfUnpooled; the CPU Winograd input transform): the
#: unpooled map is never written and the unpooling pass is gone.  The same bits.  LRP sweeps do the
#: same below their division (LRP_DIVIDE_BEFORE_UNPOOL).  False: the unpooling, then the VJP.
UNPOOL_IN_VJP = True

#: LRP sweeps run whole hand the relevance of a conv, ReLU, 2x2 max-pool triple whose conv has the flat
#: rule down still pooled (rules.core.UnpoolBelow), and the flat rule's kernel unpools it as it sums it
#: over the channels (rules.core.FlatBelowPool).  The same bits.  False: the unpooling, then the rule.
LRP_FLAT_BELOW_POOL = True

#: The flat rule's backward at a convolution (relprop.kernels.cpu.conv2d.conv2d_flat_relevance) shares its
#: samples out to the threads from this many elements read and written (r and R_in) on; below, one thread
#: (a hand-off costs 0.1-0.3 ms here; the whole pass at LeNet-5 b256 takes ~0.4 ms).
FLAT_THREADS_MIN_ELEMENTS = 1 << 21

#: Tiles (4x4 blocks of outputs) per chunk of a Winograd convolution: the rows of its 36 GEMMs.
#: Small, so that a chunk's transformed tiles and products stay in cache between the transforms
#: and the GEMMs (36 BLAS calls per chunk, issued from compiled code); but WINOGRAD_CHUNK_TILES_WIDE
#: where the filters' transform U is larger than WINOGRAD_WIDE_FILTER_BYTES (256 channels in and
#: out: 9.4 MB), as U is re-read for every chunk.  Measured (2-core EPYC, two threads, medians of
#: 15 alternating calls): 128 tiles against 512, 64->64 at 32x32 1.39x, at 224x224 1.39x, 128->128
#: at 16x16 and 112x112 1.09x and 1.03x; 256->256 at 8x8 and 56x56 512 tiles 1.06x and 1.13x.
WINOGRAD_CHUNK_TILES = 128
WINOGRAD_CHUNK_TILES_WIDE = 512
WINOGRAD_WIDE_FILTER_BYTES = 4 * 1024 * 1024

#: metrics.perturbation_curve on NumPy arrays recomputes each layer only where the step's
#: replaced patch reaches (relprop.nets.incremental); a layer whose changed box covers more
#: than this fraction of its output runs whole.
INCREMENTAL_FULL_FRACTION = 0.6

#: Large NumPy outputs of the kernels (at least BUFFER_POOL_MIN_BYTES) are views of recycled
#: buffers (relprop.kernels._pool): a freed array's buffer is kept, up to BUFFER_POOL_BYTES in
#: all, and handed out again, instead of a fresh allocation whose pages the OS faults in and
#: zeroes on first touch.  0: plain np.empty every time.
BUFFER_POOL_BYTES = 1024 * 1024 * 1024
BUFFER_POOL_MIN_BYTES = 1 << 20
