// TensorRT IPluginV3 glue of CapaContribTopK; see trt_plugin.h and README.md.
#include "trt_plugin.h"

#include "contrib_topk.h"

#include <cstring>
#include <exception>
#include <string>

using namespace nvinfer1;

namespace capa {
namespace {

ILoggerFinder* gLoggerFinder = nullptr;

void log(ILogger::Severity severity, std::string const& message) noexcept {
    try {
        ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : getLogger();
        if (logger != nullptr) logger->log(severity, (std::string("[capa::CapaContribTopK] ") + message).c_str());
    } catch (...) {
        // Logging must never throw across the TensorRT boundary.
    }
}

void logError(std::string const& message) noexcept { log(ILogger::Severity::kERROR, message); }

bool isFloatType(DataType type) { return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16; }

int dtypeCode(DataType type) {
    switch (type) {
    case DataType::kHALF: return CAPA_DTYPE_FP16;
    case DataType::kBF16: return CAPA_DTYPE_BF16;
    default: return CAPA_DTYPE_FP32;
    }
}

// The op's shape from three [B,H,Q,N], [B,H_kv,N,d], [D,H*d] dims; false when ranks are wrong.
bool shapeFromDims(Dims const& probs, Dims const& values, Dims const& weight, int32_t k, capa_contrib_topk_shape& s) {
    if (probs.nbDims != 4 || values.nbDims != 4 || weight.nbDims != 2) return false;
    s.B = static_cast<int32_t>(probs.d[0]);
    s.H = static_cast<int32_t>(probs.d[1]);
    s.Q = static_cast<int32_t>(probs.d[2]);
    s.N = static_cast<int32_t>(probs.d[3]);
    s.H_kv = static_cast<int32_t>(values.d[1]);
    s.d = static_cast<int32_t>(values.d[3]);
    s.D = static_cast<int32_t>(weight.d[0]);
    s.k = k;
    return true;
}

// Checks what is known of the dimensions (-1 = dynamic is skipped). Empty string when valid.
std::string checkDims(Dims const& probs, Dims const& values, Dims const& weight, int32_t k) {
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
    if (known(probs.d[3]) && k > probs.d[3])
        return "k=" + std::to_string(k) + " exceeds the number of keys N=" + std::to_string(probs.d[3]);
    return {};
}

} // namespace

ContribTopKPlugin::ContribTopKPlugin(int32_t k, int32_t variant) : mK(k), mVariant(variant) {
    mFields.emplace_back("k", &mK, PluginFieldType::kINT32, 1);
    mFields.emplace_back("variant", &mVariant, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

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
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    if (nbInputs != 3 || nbOutputs != 1) {
        logError("expects 3 inputs (probs, values, o_weight) and 1 output");
        return -1;
    }
    // The profile's smallest shapes bound k: k <= N must hold for every allowed N.
    std::string const error = checkDims(in[0].min, in[1].min, in[2].min, mK);
    if (!error.empty()) {
        logError(error + " (for the smallest shapes of the optimisation profile)");
        return -1;
    }
    if (in[0].desc.type != in[1].desc.type || in[0].desc.type != in[2].desc.type || !isFloatType(in[0].desc.type)) {
        logError("probs, values and o_weight must share one type: FP32, FP16 or BF16");
        return -1;
    }
    return 0;
}

int32_t ContribTopKPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept {
    if (nbInputs != 3 || nbOutputs != 1) {
        logError("expects 3 inputs (probs, values, o_weight) and 1 output");
        return -1;
    }
    if (!isFloatType(inputTypes[0]) || inputTypes[1] != inputTypes[0] || inputTypes[2] != inputTypes[0]) {
        logError("probs, values and o_weight must share one type: FP32, FP16 or BF16");
        return -1;
    }
    outputTypes[0] = DataType::kINT32;
    return 0;
}

int32_t ContribTopKPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept {
    if (nbInputs != 3 || nbOutputs != 1) {
        logError("expects 3 inputs (probs, values, o_weight) and 1 output");
        return -1;
    }
    // Validate what is constant at build time; dynamic dimensions are checked in configurePlugin.
    Dims dims[3];
    for (int32_t i = 0; i < 3; ++i) {
        dims[i].nbDims = inputs[i].nbDims;
        for (int32_t j = 0; j < inputs[i].nbDims && j < Dims::MAX_DIMS; ++j)
            dims[i].d[j] = inputs[i].d[j]->isConstant() ? inputs[i].d[j]->getConstantValue() : -1;
    }
    std::string const error = checkDims(dims[0], dims[1], dims[2], mK);
    if (!error.empty()) {
        logError(error);
        return -1;
    }
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = exprBuilder.constant(mK);
    return 0;
}

bool ContribTopKPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos > 3) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return isFloatType(desc.type);
    if (pos < 3) return desc.type == inOut[0].desc.type;
    return desc.type == DataType::kINT32;
}

size_t ContribTopKPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept {
    capa_contrib_topk_shape s{};
    if (nbInputs != 3 || !shapeFromDims(inputs[0].max, inputs[1].max, inputs[2].max, mK, s)) return 0;
    return capa_contrib_topk_workspace_size(&s, mVariant);
}

int32_t ContribTopKPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    if (nbInputs != 3 || nbOutputs != 1) return -1;
    std::string const error = checkDims(in[0].dims, in[1].dims, in[2].dims, mK);
    if (!error.empty()) {
        logError(error);
        return -1;
    }
    return 0;
}

int32_t ContribTopKPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    capa_contrib_topk_shape s{};
    if (!shapeFromDims(inputDesc[0].dims, inputDesc[1].dims, inputDesc[2].dims, mK, s)) {
        logError("enqueue: unexpected input ranks");
        return -1;
    }
    size_t const workspaceSize = capa_contrib_topk_workspace_size(&s, mVariant);
    int const status = capa_contrib_topk_launch(inputs[0], inputs[1], inputs[2], static_cast<int32_t*>(outputs[0]), &s,
        mVariant, dtypeCode(inputDesc[0].type), workspace, workspaceSize, stream);
    if (status != CAPA_OK) {
        logError(std::string("enqueue failed: ") + capa_status_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* ContribTopKPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept { return clone(); }

PluginFieldCollection const* ContribTopKPlugin::getFieldsToSerialize() noexcept { return &mFieldCollection; }

ContribTopKPluginCreator::ContribTopKPluginCreator() {
    mFields.emplace_back("k", nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("variant", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

namespace {

// An integer field (INT32 as the ONNX parser passes INT attributes; INT64 accepted too).
bool readInt(PluginField const& field, int32_t& value) {
    if (field.data == nullptr || field.length < 1) return false;
    if (field.type == PluginFieldType::kINT32) {
        value = *static_cast<int32_t const*>(field.data);
        return true;
    }
    if (field.type == PluginFieldType::kINT64) {
        value = static_cast<int32_t>(*static_cast<int64_t const*>(field.data));
        return true;
    }
    return false;
}

} // namespace

IPluginV3* ContribTopKPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept {
    try {
        int32_t k = -1;
        int32_t variant = CAPA_VARIANT_CONTRIB;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
            PluginField const& field = fc->fields[i];
            if (field.name == nullptr) continue;
            if (std::strcmp(field.name, "k") == 0 && !readInt(field, k)) {
                logError("field k must be INT32");
                return nullptr;
            }
            if (std::strcmp(field.name, "variant") == 0 && !readInt(field, variant)) {
                logError("field variant must be INT32 (0=contrib, 1=value_norm, 2=attention)");
                return nullptr;
            }
            // plugin_version / plugin_namespace and unknown fields are ignored.
        }
        if (k <= 0) {
            logError("field k is missing or <= 0 (k = number of visual tokens kept)");
            return nullptr;
        }
        if (variant < CAPA_VARIANT_CONTRIB || variant > CAPA_VARIANT_ATTENTION) {
            logError("field variant=" + std::to_string(variant) + " is unknown (0=contrib, 1=value_norm, 2=attention)");
            return nullptr;
        }
        return new ContribTopKPlugin(k, variant);
    } catch (std::exception const& e) {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace capa

// Static registration: loading the library (ctypes, Polygraphy --plugins) registers the creator.
using capa::ContribTopKPluginCreator;
REGISTER_TENSORRT_PLUGIN(ContribTopKPluginCreator);

// Entry points of IPluginRegistry::loadLibrary / trtexec --dynamicPlugins. TENSORRTAPI is empty
// outside TensorRT's own build, and the library is built with hidden visibility: export explicitly.
#define CAPA_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" CAPA_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { capa::gLoggerFinder = finder; }

extern "C" CAPA_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static capa::ContribTopKPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
