"""One frozen linear layer held in bfloat16, bitsandbytes nf4 / int8 and torchao nf4: time and error.

    python benchmarks/quantized_linear.py            # 2048x2048 weight, (1024, 2048) bfloat16 input
    python benchmarks/quantized_linear.py --size 4096

Forward and backward (the gradient reaches the input, as under a LoRA adapter) of a weight with std 0.02,
mean of ``--repeats``. Times are printed as ratios against the bfloat16 layer measured in the same run
(the machine is shared: absolute times are noise). A library that is not installed is skipped and named.
The table and the choice it led to are in docs/quantization.md.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def seconds(step, repeats: int) -> float:
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    weight = torch.randn(args.size, args.size) * 0.02
    inputs = torch.randn(args.tokens, args.size, dtype=torch.bfloat16, requires_grad=True)

    reference = torch.nn.Linear(args.size, args.size, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    reference.weight.data = weight.bfloat16()
    base = seconds(lambda: reference(inputs).sum().backward(), args.repeats)
    print(f"bfloat16 nn.Linear: 1.00x ({base * 1000:.0f} ms here)")

    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes: not installed (pip install 'tunesmith[quantize]')")
    else:
        nf4 = bnb.nn.Linear4bit(args.size, args.size, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True)
        nf4.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        nf4 = nf4.to("cpu")
        ratio = seconds(lambda: nf4(inputs).sum().backward(), args.repeats) / base
        error = (bnb.functional.dequantize_4bit(nf4.weight.data, nf4.weight.quant_state).float() - weight).abs().max()
        print(f"bitsandbytes {bnb.__version__} nf4: {ratio:.2f}x, max |W - dequantised| {error:.4f}")
        int8 = bnb.nn.Linear8bitLt(args.size, args.size, bias=False, has_fp16_weights=False)
        int8.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        int8 = int8.to("cpu")
        float_inputs = inputs.detach().float().requires_grad_()
        ratio = seconds(lambda: int8(float_inputs).sum().backward(), args.repeats) / base
        print(f"bitsandbytes {bnb.__version__} int8: {ratio:.2f}x")

    try:
        import torchao
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        print("torchao: not installed (pip install torchao)")
    else:
        quantised = to_nf4(weight.bfloat16())
        ratio = seconds(lambda: linear_nf4(inputs, quantised).sum().backward(), args.repeats) / base
        error = (quantised.get_original_weight().float() - weight).abs().max()
        print(f"torchao {torchao.__version__} nf4: {ratio:.2f}x, max |W - dequantised| {error:.4f}")


if __name__ == "__main__":
    main()
