// What the EP claims (GetCapability) and how a claimed group becomes a SparseOp (Compile).
#pragma once

#include <memory>
#include <vector>

#include "ep_common.h"
#include "ep_ops.h"

namespace onnxslim_ep {

// Groups of nodes to fuse: {Gemm | MatMul [+ bias Add] | Conv} [+ Relu], each sparse enough.
std::vector<std::vector<Ort::ConstNode>> FindClaims(const Ort::ConstGraph& graph, const EpConfig& config);

// Builds the compiled op of one fused group; `fused_node` gives the runtime input order.
std::unique_ptr<SparseOp> BuildSparseOp(const Ort::ConstGraph& group, const Ort::ConstNode& fused_node,
                                        const EpConfig& config);

}  // namespace onnxslim_ep
