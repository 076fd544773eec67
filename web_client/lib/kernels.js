// Kernels a TF.js backend lacks, built from ops it has, so graph models run there too.
//
// tfjs-backend-wasm 4.22 has no `Einsum` kernel, which Keras' MultiHeadAttention (and
// EinsumDense) compile to: registerMissingKernels(tf, 'wasm') adds one that computes a
// two-operand einsum as transpose → reshape → batched matMul → reshape → transpose, with the
// shapes known at run time. The same file serves the browser client and the Node runner
// (export/node/run_tfjs.mjs imports it; its bundle inlines it).

const LETTERS = /^[A-Za-z]*$/;

function parseEquation(equation, count) {
  const [lhs, out] = String(equation).replace(/\s+/g, '').split('->');
  const operands = (lhs ?? '').split(',');
  if (out == null || operands.length !== count || ![...operands, out].every(s => LETTERS.test(s))) {
    throw new Error(`einsum "${equation}": only explicit two-operand equations without "..." are supported here`);
  }
  for (const s of [...operands, out]) {
    if (new Set(s).size !== s.length) throw new Error(`einsum "${equation}": repeated indices in one operand are not supported here`);
  }
  return { operands, out };
}

/** einsum(equation, a, b) from transpose/reshape/matMul/sum: exact up to float summation order. */
export function einsumTwo(tf, equation, a, b) {
  const { operands: [ia0, ib0], out } = parseEquation(equation, 2);
  return tf.tidy(() => {
    let ia = ia0;
    let ib = ib0;
    let x = a;
    let y = b;
    // an index in one operand only and not in the output is summed out first
    const lonely = (own, other) => [...own].filter(c => !other.includes(c) && !out.includes(c));
    const sumOut = (t, idx, drop) => {
      if (drop.length === 0) return [t, idx];
      return [tf.sum(t, drop.map(c => idx.indexOf(c))), [...idx].filter(c => !drop.includes(c)).join('')];
    };
    [x, ia] = sumOut(x, ia, lonely(ia, ib));
    [y, ib] = sumOut(y, ib, lonely(ib, ia));
    const size = {};
    [...ia].forEach((c, i) => { size[c] = x.shape[i]; });
    [...ib].forEach((c, i) => { size[c] = y.shape[i]; });
    const batch = [...out].filter(c => ia.includes(c) && ib.includes(c));
    const left = [...out].filter(c => ia.includes(c) && !ib.includes(c));
    const right = [...out].filter(c => ib.includes(c) && !ia.includes(c));
    const contract = [...ia].filter(c => ib.includes(c) && !out.includes(c));
    if ([...out].some(c => !ia.includes(c) && !ib.includes(c))) throw new Error(`einsum "${equation}": an output index is in no operand`);
    const prod = cs => cs.reduce((n, c) => n * size[c], 1);
    const xt = tf.reshape(tf.transpose(x, [...batch, ...left, ...contract].map(c => ia.indexOf(c))),
      [prod(batch), prod(left), prod(contract)]);
    const yt = tf.reshape(tf.transpose(y, [...batch, ...contract, ...right].map(c => ib.indexOf(c))),
      [prod(batch), prod(contract), prod(right)]);
    const order = [...batch, ...left, ...right];
    const z = tf.reshape(tf.matMul(xt, yt), order.map(c => size[c]));
    return tf.transpose(z, [...out].map(c => order.indexOf(c)));
  });
}

/** Registers the kernels `backendName` lacks (today: Einsum on wasm); returns their names. */
export function registerMissingKernels(tf, backendName) {
  const added = [];
  if (backendName === 'wasm' && typeof tf.registerKernel === 'function' && !tf.getKernel('Einsum', 'wasm')) {
    tf.registerKernel({
      kernelName: 'Einsum',
      backendName: 'wasm',
      kernelFunc: ({ inputs, attrs }) => {
        const tensors = Array.isArray(inputs) ? inputs : Object.values(inputs);
        if (tensors.length !== 2) throw new Error(`einsum "${attrs.equation}": only two operands are supported on wasm`);
        return einsumTwo(tf, attrs.equation, tensors[0], tensors[1]);
      },
    });
    added.push('Einsum');
  }
  return added;
}
