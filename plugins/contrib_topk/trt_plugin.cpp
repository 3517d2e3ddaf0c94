// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// TensorRT IPluginV3 glue of CapaContribTopK; see trt_plugin.h and README.md.
#include "trt_plugin.h"

#include "contrib_topk.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <string>

using namespace nvinfer1;

namespace capa {
namespace {

void log(ILogger::Severity severity, std::string const& message) noexcept {
    try {
        std::string const line = std::string("[capa::CapaContribTopK] ") + message;
        if (ILogger* logger = pluginLogger()) {
            logger->log(severity, line.c_str());
        } else if (severity <= ILogger::Severity::kWARNING) {
            // No logger (a library loaded outside TensorRT): errors must not vanish.
            std::fprintf(stderr, "%s\n", line.c_str());
        }
    } catch (...) {
        // Logging must never throw across the TensorRT boundary.
    }
}

void logError(std::string const& message) noexcept { log(ILogger::Severity::kERROR, message); }

char const* const kIoError =
    "expects the device inputs probs, values, o_weight (a 4th, k, is ignored), the shape input k and 1 output "
    "(keep_indices)";

bool isFloatType(DataType type) { return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16; }

bool isIndexType(DataType type) { return type == DataType::kINT32 || type == DataType::kINT64; }

// Device inputs TensorRT may hand over: the three tensors, or those and k (see trt_plugin.h).
bool validInputCount(int32_t nbInputs) { return nbInputs == kNbDeviceInputs || nbInputs == kNbDeviceInputs + 1; }

int dtypeCode(DataType type) {
    switch (type) {
    case DataType::kHALF: return CAPA_DTYPE_FP16;
    case DataType::kBF16: return CAPA_DTYPE_BF16;
    default: return CAPA_DTYPE_FP32;
    }
}

std::string statusText(int status) {
    std::string text = capa_status_string(status);
    if (status == CAPA_ERR_CUDA || status == CAPA_ERR_UNSUPPORTED) {
        char const* detail = capa_last_error_message();
        if (detail != nullptr && detail[0] != '\0') text += std::string(": ") + detail;
    }
    return text;
}

// A dimension as an int32 of the C API; -1 when unknown or beyond int32.
int32_t dim32(int64_t d) {
    return (d < 0 || d > std::numeric_limits<int32_t>::max()) ? -1 : static_cast<int32_t>(d);
}

// The op's shape from [B,H,Q,N], [B,H_kv,N,d], [D,H*d] dims; false when a rank is wrong or a
// dimension is unknown or does not fit int32.
bool shapeFromDims(Dims const& probs, Dims const& values, Dims const& weight, int32_t k, capa_contrib_topk_shape& s) {
    if (probs.nbDims != 4 || values.nbDims != 4 || weight.nbDims != 2) return false;
    s = capa_contrib_topk_shape{dim32(probs.d[0]), dim32(probs.d[1]), dim32(values.d[1]), dim32(probs.d[2]),
        dim32(probs.d[3]), dim32(values.d[3]), dim32(weight.d[0]), k};
    return s.B >= 0 && s.H >= 0 && s.H_kv >= 0 && s.Q >= 0 && s.N >= 0 && s.d >= 0 && s.D >= 0;
}

// Checks what is known of the dimensions and of k (-1 = dynamic / unknown is skipped). Empty string
// when valid.
std::string checkDims(Dims const& probs, Dims const& values, Dims const& weight, int64_t k) {
    if (probs.nbDims != 4) return "input 0 (probs) must be [B, H, Q, N], rank 4";
    if (values.nbDims != 4) return "input 1 (values) must be [B, H_kv, N, d], rank 4";
    if (weight.nbDims != 2) return "input 2 (o_weight) must be [D, H*d], rank 2";
    auto known = [](int64_t a) { return a >= 0; };
    if (known(probs.d[0]) && known(values.d[0]) && probs.d[0] != values.d[0])
        return "values batch " + std::to_string(values.d[0]) + " != probs batch " + std::to_string(probs.d[0]);
    if (known(probs.d[3]) && known(values.d[2]) && probs.d[3] != values.d[2])
        return "values has " + std::to_string(values.d[2]) + " keys, probs " + std::to_string(probs.d[3]);
    if (known(probs.d[1]) && known(values.d[1]) && (values.d[1] <= 0 || probs.d[1] % values.d[1] != 0))
        return "probs heads H=" + std::to_string(probs.d[1]) + " is not a multiple of values heads H_kv=" +
            std::to_string(values.d[1]);
    if (known(probs.d[1]) && known(values.d[3]) && known(weight.d[1]) && weight.d[1] != probs.d[1] * values.d[3])
        return "o_weight has " + std::to_string(weight.d[1]) + " columns, expected H*d = " +
            std::to_string(probs.d[1] * values.d[3]);
    if (k == 0) return "k=0: at least one token must be kept";
    if (known(probs.d[3]) && k > probs.d[3])
        return "k=" + std::to_string(k) + " exceeds the number of keys N=" + std::to_string(probs.d[3]);
    return {};
}

} // namespace

IPluginCapability* ContribTopKPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* ContribTopKPlugin::clone() noexcept {
    try {
        return new ContribTopKPlugin(mK, mVariant);
    } catch (std::exception const& e) {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

int32_t ContribTopKPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    try {
        if (in == nullptr || out == nullptr || !validInputCount(nbInputs) || nbOutputs != 1) {
            logError(kIoError);
            return -1;
        }
        if (in[0].desc.type != in[1].desc.type || in[0].desc.type != in[2].desc.type || !isFloatType(in[0].desc.type)) {
            logError("probs, values and o_weight must share one type: FP32, FP16 or BF16");
            return -1;
        }
        if (nbInputs > kNbDeviceInputs && !isIndexType(in[kShapeInputK].desc.type)) {
            logError("input 3 (k) must be INT32 or INT64");
            return -1;
        }
        if (out[0].desc.type != DataType::kINT32 || out[0].min.nbDims != 2 || out[0].max.nbDims != 2) {
            logError("output 0 (keep_indices) must be INT32 [B, k]");
            return -1;
        }
        // The profile's range of k is the output's second dim (getOutputShapes made it the
        // attribute or the shape input's value). k <= N holds for every shape only if the smallest
        // k fits the smallest N and the largest k the largest N (exact when k is a constant: then
        // k <= the smallest N); every actual shape is checked again in onShapeChange.
        int64_t const kMin = mK > 0 ? mK : out[0].min.d[1];
        int64_t const kMax = mK > 0 ? mK : out[0].max.d[1];
        for (bool smallest : {true, false}) {
            std::string const error = smallest ? checkDims(in[0].min, in[1].min, in[2].min, kMin)
                                               : checkDims(in[0].max, in[1].max, in[2].max, kMax);
            if (!error.empty()) {
                logError(error + (smallest ? " (smallest shapes of the optimisation profile)"
                                           : " (largest shapes of the optimisation profile)"));
                return -1;
            }
        }
        // What the kernels cannot run on this GPU fails here, at build time, not at the first enqueue.
        capa_contrib_topk_shape s{};
        // The kernels' limits do not depend on k; any valid k will do when the profile's is unknown.
        int32_t const kForCheck = kMax > 0 ? static_cast<int32_t>(kMax) : 1;
        if (!shapeFromDims(in[0].max, in[1].max, in[2].max, kForCheck, s)) {
            logError("the optimisation profile's largest shapes are unknown or beyond int32");
            return -1;
        }
        int device = 0;
        if (mVariant == CAPA_VARIANT_CONTRIB) { // the only variant with a device-dependent limit
            cudaError_t const err = cudaGetDevice(&device);
            if (err != cudaSuccess) {
                logError(std::string("cannot query the CUDA device for the contrib kernel's limits: cudaGetDevice failed: ") +
                    cudaGetErrorString(err));
                return -1;
            }
        }
        int const status = capa_contrib_topk_check_device(&s, mVariant, device);
        if (status != CAPA_OK) {
            logError("unsupported configuration: " + statusText(status));
            return -1;
        }
        return 0;
    } catch (std::exception const& e) {
        logError(std::string("configurePlugin failed: ") + e.what());
    }
    return -1;
}

int32_t ContribTopKPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept {
    if (outputTypes == nullptr || inputTypes == nullptr || !validInputCount(nbInputs) || nbOutputs != 1) {
        logError(kIoError);
        return -1;
    }
    if (!isFloatType(inputTypes[0]) || inputTypes[1] != inputTypes[0] || inputTypes[2] != inputTypes[0]) {
        logError("probs, values and o_weight must share one type: FP32, FP16 or BF16");
        return -1;
    }
    if (nbInputs > kNbDeviceInputs && !isIndexType(inputTypes[kShapeInputK])) {
        logError("input 3 (k) must be INT32 or INT64");
        return -1;
    }
    outputTypes[0] = DataType::kINT32;
    return 0;
}

int32_t ContribTopKPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept {
    try {
        if (inputs == nullptr || outputs == nullptr || !validInputCount(nbInputs) || nbOutputs != 1) {
            logError(kIoError);
            return -1;
        }
        // k: the shape input's value (its one "dimension": k is an int64 [1] tensor), or the attribute.
        IDimensionExpr const* kInput = nullptr;
        if (nbShapeInputs > 1 || (nbShapeInputs == 1 && (shapeInputs == nullptr || shapeInputs[0].nbDims != 1 ||
                                                          shapeInputs[0].d[0] == nullptr))) {
            logError("expects at most one shape input, k, holding one value (shape [1]); got " +
                std::to_string(nbShapeInputs) + " shape inputs" +
                (nbShapeInputs == 1 && shapeInputs != nullptr ? " with " + std::to_string(shapeInputs[0].nbDims) + " values"
                                                              : std::string()));
            return -1;
        }
        if (nbShapeInputs == 1) kInput = shapeInputs[0].d[0];
        if (mK == 0 && kInput == nullptr) {
            logError("attribute k=0 takes k from the shape input, but the node has none (input 3 must be named by "
                     "tensorrt_plugin_shape_input_indices)");
            return -1;
        }
        int64_t kKnown = -1; // -1: k is not a build-time constant
        if (mK > 0) {
            kKnown = mK;
            if (kInput != nullptr && kInput->isConstant() && kInput->getConstantValue() != mK) {
                logError("input k holds " + std::to_string(kInput->getConstantValue()) + " but attribute k=" +
                    std::to_string(mK) + " (the attribute must be 0 or equal to the input)");
                return -1;
            }
        } else if (kInput->isConstant()) {
            kKnown = kInput->getConstantValue();
            if (kKnown < 1) {
                logError("input k holds " + std::to_string(kKnown) + ": at least one token must be kept");
                return -1;
            }
        }
        // Validate what is constant at build time; dynamic dimensions are checked in configurePlugin.
        Dims dims[3];
        for (int32_t i = 0; i < kNbDeviceInputs; ++i) {
            if (inputs[i].nbDims < 0 || inputs[i].nbDims > Dims::MAX_DIMS) {
                logError("input " + std::to_string(i) + " has an invalid rank " + std::to_string(inputs[i].nbDims));
                return -1;
            }
            dims[i].nbDims = inputs[i].nbDims;
            for (int32_t j = 0; j < inputs[i].nbDims; ++j)
                dims[i].d[j] = inputs[i].d[j]->isConstant() ? inputs[i].d[j]->getConstantValue() : -1;
        }
        std::string const error = checkDims(dims[0], dims[1], dims[2], kKnown);
        if (!error.empty()) {
            logError(error);
            return -1;
        }
        IDimensionExpr const* k = mK > 0 ? exprBuilder.constant(mK) : kInput;
        if (k == nullptr) {
            logError("IExprBuilder::constant(k) returned nullptr");
            return -1;
        }
        outputs[0].nbDims = 2;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = k;
        return 0;
    } catch (std::exception const& e) {
        logError(std::string("getOutputShapes failed: ") + e.what());
    }
    return -1;
}

bool ContribTopKPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (inOut == nullptr || !validInputCount(nbInputs) || nbOutputs != 1 || pos < 0 || pos > nbInputs) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return isFloatType(desc.type);
    if (pos < kNbDeviceInputs) return desc.type == inOut[0].desc.type;
    if (pos < nbInputs) return isIndexType(desc.type); // k as a device input: never read
    return desc.type == DataType::kINT32;
}

size_t ContribTopKPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept {
    // The workspace ([B, N] scores, per-key norms) does not depend on k.
    capa_contrib_topk_shape s{};
    if (inputs == nullptr || !validInputCount(nbInputs) ||
        !shapeFromDims(inputs[0].max, inputs[1].max, inputs[2].max, 1, s))
        return 0;
    return capa_contrib_topk_workspace_size(&s, mVariant);
}

int32_t ContribTopKPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    try {
        if (in == nullptr || out == nullptr || !validInputCount(nbInputs) || nbOutputs != 1) {
            logError(kIoError);
            return -1;
        }
        // This shape's k is the output's second dim (the attribute, or the shape input's value).
        if (out[0].dims.nbDims != 2 || out[0].dims.d[1] < 0 || (mK > 0 && out[0].dims.d[1] != mK)) {
            logError("output 0 (keep_indices) must be [B, k]" + (mK > 0 ? " with k=" + std::to_string(mK) : std::string()));
            return -1;
        }
        std::string const error = checkDims(in[0].dims, in[1].dims, in[2].dims, out[0].dims.d[1]);
        if (!error.empty()) {
            logError(error);
            return -1;
        }
        return 0;
    } catch (std::exception const& e) {
        logError(std::string("onShapeChange failed: ") + e.what());
    }
    return -1;
}

int32_t ContribTopKPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    try {
        // k is read from the output's dims: TensorRT sized keep_indices [B, k] from getOutputShapes.
        if (outputDesc == nullptr || outputDesc[0].dims.nbDims != 2 || dim32(outputDesc[0].dims.d[1]) < 0) {
            logError("enqueue: output 0 (keep_indices) is not [B, k] with an int32 k");
            return -1;
        }
        int32_t const k = dim32(outputDesc[0].dims.d[1]);
        capa_contrib_topk_shape s{};
        if (inputDesc == nullptr || !shapeFromDims(inputDesc[0].dims, inputDesc[1].dims, inputDesc[2].dims, k, s)) {
            logError("enqueue: inputs are not [B, H, Q, N], [B, H_kv, N, d], [D, H*d] with int32 dimensions");
            return -1;
        }
        if (s.B == 0) return 0; // empty batch: the [0, k] output has nothing to write
        if (inputs == nullptr || outputs == nullptr) {
            logError("enqueue: null input or output array");
            return -1;
        }
        size_t const workspaceSize = capa_contrib_topk_workspace_size(&s, mVariant);
        int const status = capa_contrib_topk_launch(inputs[0], inputs[1], inputs[2], static_cast<int32_t*>(outputs[0]),
            &s, mVariant, dtypeCode(inputDesc[0].type), workspace, workspaceSize, stream);
        if (status != CAPA_OK) {
            logError("enqueue failed: " + statusText(status));
            return -1;
        }
        return 0;
    } catch (std::exception const& e) {
        logError(std::string("enqueue failed: ") + e.what());
    }
    return -1;
}

IPluginV3* ContribTopKPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept { return clone(); }

PluginFieldCollection const* ContribTopKPlugin::getFieldsToSerialize() noexcept {
    try {
        mSerialFields.clear();
        mSerialFields.emplace_back(kFieldK, &mK, PluginFieldType::kINT32, 1);
        mSerialFields.emplace_back(kFieldVariant, &mVariant, PluginFieldType::kINT32, 1);
        mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
        mSerialCollection.fields = mSerialFields.data();
        return &mSerialCollection;
    } catch (std::exception const& e) {
        logError(std::string("getFieldsToSerialize failed: ") + e.what());
    }
    return nullptr;
}

ContribTopKPluginCreator::ContribTopKPluginCreator() {
    mFields.emplace_back(kFieldK, nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back(kFieldVariant, nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back(kFieldPluginVersion, nullptr, PluginFieldType::kCHAR, 0);
    mFields.emplace_back(kFieldPluginNamespace, nullptr, PluginFieldType::kCHAR, 0);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

namespace {

// One integer (INT32, or INT64 as some exporters write INT attributes), range-checked before it
// is narrowed. Empty string when read, else what is wrong.
std::string readInt(PluginField const& field, int64_t low, int64_t high, int32_t& value) {
    std::string const name = field.name;
    if (field.data == nullptr || field.length != 1)
        return "field " + name + " must hold exactly one integer (got length " + std::to_string(field.length) + ")";
    int64_t v = 0;
    if (field.type == PluginFieldType::kINT32) {
        v = *static_cast<int32_t const*>(field.data);
    } else if (field.type == PluginFieldType::kINT64) {
        v = *static_cast<int64_t const*>(field.data);
    } else {
        return "field " + name + " must be INT32 or INT64 (PluginFieldType " +
            std::to_string(static_cast<int32_t>(field.type)) + " given)";
    }
    if (v < low || v > high)
        return "field " + name + "=" + std::to_string(v) + " is out of range [" + std::to_string(low) + ", " +
            std::to_string(high) + "]";
    value = static_cast<int32_t>(v);
    return {};
}

// A CHAR field as a string (with or without its NUL terminator). Empty string when read.
std::string readString(PluginField const& field, std::string& value) {
    if (field.type != PluginFieldType::kCHAR || field.data == nullptr || field.length < 0)
        return std::string("field ") + field.name + " must be a CHAR string";
    char const* chars = static_cast<char const*>(field.data);
    value.assign(chars, strnlen(chars, static_cast<size_t>(field.length)));
    return {};
}

} // namespace

IPluginV3* ContribTopKPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept {
    try {
        if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr) || fc->nbFields < 0) {
            logError("createPlugin: no field collection (field k is required)");
            return nullptr;
        }
        int32_t k = -1;
        int32_t variant = CAPA_VARIANT_CONTRIB;
        bool seen[4] = {false, false, false, false};
        char const* const names[4] = {kFieldK, kFieldVariant, kFieldPluginVersion, kFieldPluginNamespace};
        for (int32_t i = 0; i < fc->nbFields; ++i) {
            PluginField const& field = fc->fields[i];
            int which = -1;
            for (int n = 0; n < 4 && field.name != nullptr; ++n)
                if (std::strcmp(field.name, names[n]) == 0) which = n;
            if (which < 0) {
                logError(std::string("unknown field '") + (field.name != nullptr ? field.name : "(null)") +
                    "'; expected k, variant, plugin_version, plugin_namespace");
                return nullptr;
            }
            if (seen[which]) {
                logError(std::string("field ") + names[which] + " given twice");
                return nullptr;
            }
            seen[which] = true;
            std::string error;
            std::string text;
            switch (which) {
            case 0: // 0: k comes from the shape input (a fraction of N computed in the graph)
                error = readInt(field, 0, std::numeric_limits<int32_t>::max(), k);
                break;
            case 1:
                error = readInt(field, CAPA_VARIANT_CONTRIB, CAPA_VARIANT_ATTENTION, variant);
                if (!error.empty()) error += " (0=contrib, 1=value_norm, 2=attention)";
                break;
            case 2:
                error = readString(field, text);
                if (error.empty() && text != kPluginVersion)
                    error = "field plugin_version='" + text + "' but this creator is version " + kPluginVersion;
                break;
            default:
                error = readString(field, text);
                if (error.empty() && text != kPluginNamespace)
                    error = "field plugin_namespace='" + text + "' but this creator's namespace is " + kPluginNamespace;
                break;
            }
            if (!error.empty()) {
                logError(error);
                return nullptr;
            }
        }
        if (!seen[0]) {
            logError("field k is missing (k = number of visual tokens kept, or 0 to read it from the shape input k)");
            return nullptr;
        }
        return new ContribTopKPlugin(k, variant);
    } catch (std::exception const& e) {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace capa
