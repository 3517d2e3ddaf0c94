// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// TensorRT IPluginV3 glue of CapaContribTopK. The math lives in contrib_topk_kernels.cu behind
// contrib_topk.h; this file only maps TensorRT's build/runtime interfaces onto that launch API.
//
// Nothing here registers the creator or calls into libnvinfer: the two shared libraries built from
// it decide how the creator reaches TensorRT (trt_plugin_vc.cpp: getCreators / setLoggerFinder for
// IPluginRegistry::loadLibrary, trtexec --dynamicPlugins and version-compatible engines;
// trt_plugin_autoreg.cpp: self-registration when loaded with ctypes). Name, version, namespace and
// fields are those of CapaContribTopK_PluginConfig.yaml (tests/test_op_spec.py checks them).
#ifndef CAPA_TRT_PLUGIN_H
#define CAPA_TRT_PLUGIN_H

#include <NvInfer.h>

#include <cstdint>
#include <vector>

namespace capa {

constexpr char const* kPluginName = "CapaContribTopK";
constexpr char const* kPluginVersion = "2";
constexpr char const* kPluginNamespace = "capa";

// Creator fields: the ONNX node's attributes (the parser passes INT as INT32, STRING as CHAR; it
// passes only attributes named by getFieldNames, so the node's tensorrt_plugin_shape_input_indices
// never reaches createPlugin).
constexpr char const* kFieldK = "k";
constexpr char const* kFieldVariant = "variant";
constexpr char const* kFieldPluginVersion = "plugin_version";
constexpr char const* kFieldPluginNamespace = "plugin_namespace";

// Where log messages go. Each library variant defines it: the logger TensorRT hands over through
// setLoggerFinder (trt_plugin_vc.cpp) or the process's getLogger() (trt_plugin_autoreg.cpp).
// May return nullptr; messages then go to stderr.
nvinfer1::ILogger* pluginLogger() noexcept;

// Version 2's tensors. The ONNX node has four inputs: probs, values, o_weight and k (int64 [1], the
// number of tokens kept). TensorRT's ONNX parser hands the inputs named by the node's
// tensorrt_plugin_shape_input_indices (= [kShapeInputK]) to addPluginV3 as shape inputs: the plugin
// sees probs, values, o_weight as its device inputs and k only as the value expression
// shapeInputs[0].d[0] of getOutputShapes. A 4th device input (k again, INT32 or INT64) is tolerated
// everywhere and ignored, in case a TensorRT passes shape inputs as device inputs too.
constexpr int32_t kNbDeviceInputs = 3;
constexpr int32_t kShapeInputK = 3;

class ContribTopKPlugin final : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime {
public:
    ContribTopKPlugin(int32_t k, int32_t variant) noexcept : mK(k), mVariant(variant) {}
    ~ContribTopKPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override { return 1; }
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    // Tokens kept when fixed at build time (the output's second dim); 0: the k shape input's value.
    int32_t mK;
    int32_t mVariant;
    // Rebuilt by getFieldsToSerialize (never copied: a copied collection would point into the
    // object it was copied from).
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class ContribTopKPluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    ContribTopKPluginCreator();
    ~ContribTopKPluginCreator() override = default;

    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    // Accepts exactly the fields k (required, 0..2^31-1, INT32 or INT64; 0 = k is the shape input's
    // value), variant (0 contrib, 1 value_norm, 2 attention; INT32 or INT64), plugin_version ("2")
    // and plugin_namespace ("capa"); anything else is an error, logged, and nullptr is returned.
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace capa

#endif // CAPA_TRT_PLUGIN_H
