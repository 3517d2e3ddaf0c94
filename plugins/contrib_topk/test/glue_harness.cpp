// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// Glue harness: drives the built plugin libraries through their exported entry points and the
// IPluginV3 methods, with the stand-ins of trt_standins.h in place of TensorRT, and prints what it
// observes as JSON lines ({"case": ...}). It judges nothing: tests/test_plugin_glue.py holds the
// expectations (from the op's YAML manifest and independent formulas) and compares.
//
//   capa_plugin_glue_harness <libcapa_contrib_topk_plugin.so> <libcapa_contrib_topk_plugin_autoreg.so>
//                            <stand-in libnvinfer.so.N>
#include "contrib_topk.h"
#include "trt_standins.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <deque>
#include <initializer_list>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;
using capa_test::StandInExprBuilder;
using capa_test::StandInLogger;
using capa_test::StandInLoggerFinder;
using capa_test::StandInRegistry;

namespace {

// ---- JSON output --------------------------------------------------------------------------------

std::string quote(std::string const& s) {
    std::string out = "\"";
    for (char c : s) {
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\t': out += "\\t"; break;
        default:
            if (static_cast<unsigned char>(c) < 0x20) {
                char buf[8];
                std::snprintf(buf, sizeof buf, "\\u%04x", c);
                out += buf;
            } else {
                out += c;
            }
        }
    }
    return out + "\"";
}

class Line {
public:
    explicit Line(std::string const& name) { mOut << "{\"case\": " << quote(name); }
    Line& add(std::string const& key, std::string const& value) { return raw(key, quote(value)); }
    Line& add(std::string const& key, char const* value) { return raw(key, quote(value != nullptr ? value : "")); }
    Line& add(std::string const& key, bool value) { return raw(key, value ? "true" : "false"); }
    Line& add(std::string const& key, int64_t value) { return raw(key, std::to_string(value)); }
    Line& add(std::string const& key, int32_t value) { return raw(key, std::to_string(value)); }
    Line& add(std::string const& key, uint64_t value) { return raw(key, std::to_string(value)); }
    Line& raw(std::string const& key, std::string const& json) {
        mOut << ", " << quote(key) << ": " << json;
        return *this;
    }
    ~Line() { std::cout << mOut.str() << "}" << std::endl; }

private:
    std::ostringstream mOut;
};

std::string keysJson(std::vector<capa_test::CreatorKey> const& keys) {
    std::string out = "[";
    for (size_t i = 0; i < keys.size(); ++i)
        out += (i ? ", [" : "[") + quote(keys[i].name) + ", " + quote(keys[i].version) + ", " + quote(keys[i].nameSpace) + "]";
    return out + "]";
}

// ---- plugin fields ------------------------------------------------------------------------------

// Owns the data of a PluginFieldCollection built by a test case.
class Fields {
public:
    Fields& i32(char const* name, std::initializer_list<int32_t> values) {
        mI32.emplace_back(values);
        mFields.emplace_back(name, mI32.back().data(), PluginFieldType::kINT32, static_cast<int32_t>(values.size()));
        return *this;
    }
    Fields& i64(char const* name, int64_t value) {
        mI64.push_back(value);
        mFields.emplace_back(name, &mI64.back(), PluginFieldType::kINT64, 1);
        return *this;
    }
    Fields& f32(char const* name, float value) {
        mF32.push_back(value);
        mFields.emplace_back(name, &mF32.back(), PluginFieldType::kFLOAT32, 1);
        return *this;
    }
    // A CHAR field as TensorRT's ONNX parser passes it (NUL included) or without the NUL.
    Fields& str(char const* name, std::string const& value, bool withNul = true) {
        mStr.push_back(value);
        mFields.emplace_back(name, mStr.back().c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(value.size() + (withNul ? 1 : 0)));
        return *this;
    }
    Fields& null(char const* name, PluginFieldType type) {
        mFields.emplace_back(name, nullptr, type, 1);
        return *this;
    }
    PluginFieldCollection const* collection() {
        mFc.nbFields = static_cast<int32_t>(mFields.size());
        mFc.fields = mFields.data();
        return &mFc;
    }

private:
    std::deque<std::vector<int32_t>> mI32;
    std::deque<int64_t> mI64;
    std::deque<float> mF32;
    std::deque<std::string> mStr;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFc{};
};

std::string fieldsJson(PluginFieldCollection const* fc) {
    if (fc == nullptr) return "null";
    std::string out = "[";
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        std::string value = "null";
        if (f.data != nullptr && f.length == 1 && f.type == PluginFieldType::kINT32)
            value = std::to_string(*static_cast<int32_t const*>(f.data));
        out += (i ? ", " : "") + std::string("{\"name\": ") + quote(f.name != nullptr ? f.name : "") +
            ", \"type\": " + std::to_string(static_cast<int32_t>(f.type)) + ", \"length\": " + std::to_string(f.length) +
            ", \"value\": " + value + "}";
    }
    return out + "]";
}

IPluginV3OneCore* core(IPluginV3* p) {
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}
IPluginV3OneBuild* build(IPluginV3* p) {
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* p) {
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

// ---- tensor descriptions ------------------------------------------------------------------------

Dims dims(std::initializer_list<int64_t> values) {
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    int32_t i = 0;
    for (int64_t v : values) d.d[i++] = v;
    return d;
}

struct Io {
    Dims probs, values, weight;
};

DynamicPluginTensorDesc dynDesc(Dims const& min, Dims const& max, DataType type) {
    DynamicPluginTensorDesc d{};
    d.desc.dims = max;
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.min = min;
    d.opt = max;
    d.max = max;
    return d;
}

std::string plain(char const* s) { return s != nullptr ? s : ""; }

} // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s <vc library> <autoreg library> <stand-in libnvinfer.so.N>\n", argv[0]);
        return 2;
    }
    char const* const vcPath = argv[1];
    char const* const autoregPath = argv[2];
    char const* const standinPath = argv[3];

    int deviceCount = 0;
    cudaError_t const deviceErr = cudaGetDeviceCount(&deviceCount);
    if (deviceErr != cudaSuccess) deviceCount = 0;
    Line("cuda").add("devices", static_cast<int32_t>(deviceCount)).add("error", cudaGetErrorString(deviceErr));
    cudaGetLastError();

    // ---- path 1: IPluginRegistry::loadLibrary of the version-compatible library ------------------
    StandInLogger logger;
    StandInLoggerFinder finder(&logger);
    StandInRegistry registry(&finder);
    {
        void* handle = registry.loadLibrary(vcPath);
        Line("vc_load_library")
            .add("loaded", handle != nullptr)
            .add("error", registry.lastLoadError)
            .add("register_calls", static_cast<int32_t>(registry.registerCalls))
            .raw("registered", keysJson(registry.keys()));
        if (handle == nullptr) return 1;
        // A second loadLibrary of the same library into the same registry must be refused.
        void* again = registry.loadLibrary(vcPath);
        Line("vc_load_library_again").add("loaded", again != nullptr).add("error", registry.lastLoadError);
    }
    // The creator of that name, whatever version it declares: the test compares the version with
    // the manifest's.
    auto const findCreator = [](StandInRegistry& r) -> IPluginCreatorInterface* {
        for (auto const& key : r.keys())
            if (key.name == "CapaContribTopK") return r.getCreator(key.name.c_str(), key.version.c_str(), key.nameSpace.c_str());
        return nullptr;
    };
    auto* creatorInterface = findCreator(registry);
    if (creatorInterface == nullptr) {
        Line("creator").add("found", false);
        return 1;
    }
    auto* creator = static_cast<IPluginCreatorV3One*>(creatorInterface);
    Line("creator")
        .add("found", true)
        .add("kind", creatorInterface->getInterfaceInfo().kind)
        .add("name", creator->getPluginName())
        .add("version", creator->getPluginVersion())
        .add("namespace", creator->getPluginNamespace())
        .raw("fields", fieldsJson(creator->getFieldNames()));

    // ---- path 2: ctypes-style load of the self-registering library ------------------------------
    {
        void* nvinfer = dlopen(standinPath, RTLD_NOW | RTLD_LOCAL); // as the tensorrt wheel does
        auto getRegistry = nvinfer ? reinterpret_cast<IPluginRegistry* (*)()>(dlsym(nvinfer, "getPluginRegistry")) : nullptr;
        auto getLogger = nvinfer ? reinterpret_cast<ILogger* (*)()>(dlsym(nvinfer, "getLogger")) : nullptr;
        if (getRegistry == nullptr || getLogger == nullptr) {
            Line("autoreg_ctypes").add("standin_loaded", false).add("error", plain(dlerror()));
            return 1;
        }
        auto* standinRegistry = static_cast<StandInRegistry*>(getRegistry());
        auto* standinLogger = static_cast<StandInLogger*>(getLogger());
        int const before = standinRegistry->registerCalls;
        void* autoreg = dlopen(autoregPath, RTLD_NOW | RTLD_LOCAL); // ctypes.CDLL's mode
        std::string const error = autoreg == nullptr ? plain(dlerror()) : "";
        Line("autoreg_ctypes")
            .add("standin_loaded", true)
            .add("loaded", autoreg != nullptr)
            .add("error", error)
            .add("register_calls", static_cast<int32_t>(standinRegistry->registerCalls - before))
            .raw("registered", keysJson(standinRegistry->keys()))
            .add("exports_getCreators", autoreg != nullptr && dlsym(autoreg, "getCreators") != nullptr)
            .add("exports_setLoggerFinder", autoreg != nullptr && dlsym(autoreg, "setLoggerFinder") != nullptr);
        // Its creator logs through the process's getLogger().
        auto* autoregCreator = static_cast<IPluginCreatorV3One*>(findCreator(*standinRegistry));
        if (autoregCreator != nullptr) {
            Fields bad;
            bad.i32("k", {-1});
            IPluginV3* p = autoregCreator->createPlugin("bad", bad.collection(), TensorRTPhase::kBUILD);
            Line("autoreg_logs").add("created", p != nullptr).add("error", standinLogger->takeLastError());
            delete p;
        }
        // Both libraries in one registry: the second registration is refused (documented).
        void* both = standinRegistry->loadLibrary(vcPath);
        Line("autoreg_then_vc_load_library").add("loaded", both != nullptr).add("error", standinRegistry->lastLoadError);
    }

    // ---- createPlugin from parser-style and bad fields ------------------------------------------
    struct CreateCase {
        char const* label;
        Fields fields;
        bool nullCollection = false;
    };
    std::deque<CreateCase> cases; // a deque: Fields must not move once its collection points into it
    auto add = [&](char const* label) -> Fields& {
        cases.push_back(CreateCase{label, Fields{}});
        return cases.back().fields;
    };
    add("parser_fields").i32("k", {16}).i32("variant", {0}).str("plugin_version", "2").str("plugin_namespace", "capa");
    add("parser_fields_k_from_input").i32("k", {0}).i32("variant", {1}).str("plugin_version", "2").str("plugin_namespace", "capa");
    add("runtime_fields").i32("k", {16}).i32("variant", {2});
    add("int64_fields").i64("k", 7).i64("variant", 1);
    add("k_only").i32("k", {3});
    add("strings_without_nul").i32("k", {5}).str("plugin_version", "2", false).str("plugin_namespace", "capa", false);
    add("k_max_int32").i64("k", 2147483647LL);
    add("no_fields");
    cases.push_back(CreateCase{"null_collection", Fields{}, true});
    add("k_zero").i32("k", {0});
    add("k_zero_int64").i64("k", 0);
    add("k_negative").i32("k", {-5});
    add("k_int64_above_int32").i64("k", 2147483648LL);
    add("k_int64_negative").i64("k", -(1LL << 40));
    add("k_float").f32("k", 16.0F);
    add("k_two_values").i32("k", {16, 16});
    add("k_null_data").null("k", PluginFieldType::kINT32);
    add("variant_3").i32("k", {4}).i32("variant", {3});
    add("variant_negative").i32("k", {4}).i32("variant", {-1});
    add("variant_int64_huge").i32("k", {4}).i64("variant", 1LL << 33);
    add("plugin_version_1").i32("k", {4}).str("plugin_version", "1");
    add("plugin_namespace_other").i32("k", {4}).str("plugin_namespace", "other");
    add("plugin_version_as_int").i32("k", {4}).i32("plugin_version", {2});
    add("unknown_field").i32("k", {4}).i32("topk", {4});
    add("duplicate_k").i32("k", {4}).i32("k", {5});
    add("null_field_name").i32("k", {4}).i32(nullptr, {1});
    for (auto& c : cases) {
        logger.takeLastError();
        IPluginV3* p = creator->createPlugin("node", c.nullCollection ? nullptr : c.fields.collection(), TensorRTPhase::kBUILD);
        std::string const error = logger.takeLastError();
        Line line("create");
        line.add("label", c.label).add("created", p != nullptr).add("error", error);
        if (p != nullptr) {
            PluginFieldCollection const* serial = runtime(p)->getFieldsToSerialize();
            line.raw("serialized", fieldsJson(serial));
            // Round trip: what TensorRT stores in the engine recreates the same plugin.
            IPluginV3* again = creator->createPlugin("node", serial, TensorRTPhase::kRUNTIME);
            line.add("roundtrip_created", again != nullptr);
            if (again != nullptr) line.raw("roundtrip_serialized", fieldsJson(runtime(again)->getFieldsToSerialize()));
            delete again;
            delete p;
        }
    }

    // ---- one plugin for the method checks ---------------------------------------------------------
    auto makePlugin = [&](int32_t k, int32_t variant) {
        Fields f;
        f.i32("k", {k}).i32("variant", {variant}).str("plugin_version", "2").str("plugin_namespace", "capa");
        return creator->createPlugin("node", f.collection(), TensorRTPhase::kBUILD);
    };

    {
        IPluginV3* p = makePlugin(16, 0);
        IPluginV3* c = p->clone();
        IPluginV3* a = runtime(p)->attachToContext(nullptr);
        Line("clone_attach")
            .add("clone_distinct", c != nullptr && c != p)
            .add("attach_distinct", a != nullptr && a != p && a != c)
            .raw("original", fieldsJson(runtime(p)->getFieldsToSerialize()))
            .raw("clone", c ? fieldsJson(runtime(c)->getFieldsToSerialize()) : "null")
            .raw("attached", a ? fieldsJson(runtime(a)->getFieldsToSerialize()) : "null")
            .add("core_name", c ? core(c)->getPluginName() : "")
            .add("core_version", c ? core(c)->getPluginVersion() : "")
            .add("core_namespace", c ? core(c)->getPluginNamespace() : "")
            .add("nb_outputs", static_cast<int32_t>(build(p)->getNbOutputs()))
            .add("unknown_capability_null",
                p->getCapabilityInterface(static_cast<PluginCapabilityType>(99)) == nullptr);
        delete a;
        delete c;
        delete p;
    }

    // ---- output shapes ----------------------------------------------------------------------------
    {
        // kInput: the k shape input's value; kNoInput: no shape input, kSymbolic: a value known only
        // at run time (k computed from N in the graph).
        constexpr int64_t kNoInput = -2;
        constexpr int64_t kSymbolic = -1;
        struct ShapeCase {
            char const* label;
            int32_t k; // the attribute
            int64_t kInput;
            std::vector<int64_t> probs, values, weight; // -1: symbolic (dynamic) dimension
            int32_t nbShapeInputs = -1;                 // -1: 1 when kInput != kNoInput, else 0
            int32_t kValues = 1;                        // values held by the shape input ([1] -> 1)
            bool kAsDeviceInput = false;                // k also among the device inputs (4 inputs)
        };
        std::vector<int64_t> const P{2, 8, 4, 96}, V{2, 2, 96, 32}, W{64, 256};
        std::vector<int64_t> const Pdyn{-1, 8, 4, -1}, Vdyn{-1, 2, -1, 32};
        std::vector<ShapeCase> shapeCases = {
            {"static", 16, kNoInput, P, V, W},
            {"dynamic_batch_and_keys", 16, kNoInput, Pdyn, Vdyn, W},
            {"attribute_with_equal_input", 16, 16, P, V, W},
            {"attribute_with_symbolic_input", 16, kSymbolic, Pdyn, Vdyn, W},
            {"attribute_disagrees_with_input", 16, 8, P, V, W},
            {"from_input_symbolic", 0, kSymbolic, Pdyn, Vdyn, W},
            {"from_input_constant", 0, 12, P, V, W},
            {"from_input_k_device_input_too", 0, kSymbolic, Pdyn, Vdyn, W, -1, 1, true},
            {"from_input_above_n", 0, 200, P, V, W},
            {"from_input_zero", 0, 0, P, V, W},
            {"from_input_negative", 0, -3, P, V, W},
            {"from_input_missing", 0, kNoInput, P, V, W},
            {"two_shape_inputs", 0, kSymbolic, P, V, W, 2},
            {"shape_input_two_values", 0, kSymbolic, P, V, W, -1, 2},
            {"probs_rank_3", 16, kNoInput, {8, 4, 96}, V, W},
            {"heads_not_multiple", 16, kNoInput, {2, 6, 4, 96}, {2, 4, 96, 32}, {64, 192}},
            {"keys_mismatch", 16, kNoInput, P, {2, 2, 95, 32}, W},
            {"o_weight_columns", 16, kNoInput, P, V, {64, 255}},
            {"k_above_n", 16, kNoInput, {2, 8, 4, 8}, {2, 2, 8, 32}, W},
        };
        for (auto const& sc : shapeCases) {
            IPluginV3* p = makePlugin(sc.k, 0);
            StandInExprBuilder builder;
            DimsExprs in[4];
            std::vector<int64_t> const* src[3] = {&sc.probs, &sc.values, &sc.weight};
            for (int i = 0; i < 3; ++i) {
                in[i].nbDims = static_cast<int32_t>(src[i]->size());
                for (size_t j = 0; j < src[i]->size(); ++j)
                    in[i].d[j] = builder.make((*src[i])[j] >= 0, (*src[i])[j]);
            }
            in[3].nbDims = 1; // k's shape [1], when TensorRT passes it as a device input too
            in[3].d[0] = builder.make(true, 1);
            // A symbolic value is encoded with constant = false; a negative constant (-3) is kept.
            DimsExprs shape[2];
            for (auto& e : shape) {
                e.nbDims = sc.kValues;
                for (int32_t j = 0; j < sc.kValues; ++j)
                    e.d[j] = sc.kInput == kSymbolic ? builder.make(false, 0) : builder.make(true, sc.kInput);
            }
            int32_t const nbShape = sc.nbShapeInputs >= 0 ? sc.nbShapeInputs : (sc.kInput == kNoInput ? 0 : 1);
            DimsExprs out[1];
            logger.takeLastError();
            int32_t const rc = build(p)->getOutputShapes(
                in, sc.kAsDeviceInput ? 4 : 3, nbShape > 0 ? shape : nullptr, nbShape, out, 1, builder);
            Line line("output_shapes");
            line.add("label", sc.label).add("rc", rc).add("error", logger.takeLastError());
            if (rc == 0) {
                line.add("nb_dims", out[0].nbDims)
                    .add("d0_is_input_batch", out[0].d[0] == in[0].d[0])
                    .add("d1_is_shape_input", nbShape > 0 && out[0].d[1] == shape[0].d[0])
                    .add("d1_constant", out[0].d[1]->isConstant())
                    .add("d1_value", out[0].d[1]->isConstant() ? out[0].d[1]->getConstantValue() : int64_t{-1});
            }
            delete p;
        }
    }
    {
        IPluginV3* p = makePlugin(16, 0);
        DataType outType{};
        struct TypeCase {
            char const* label;
            DataType a, b, c;
        };
        std::vector<TypeCase> typeCases = {{"fp32", DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT},
            {"fp16", DataType::kHALF, DataType::kHALF, DataType::kHALF},
            {"bf16", DataType::kBF16, DataType::kBF16, DataType::kBF16},
            {"mixed", DataType::kHALF, DataType::kFLOAT, DataType::kHALF},
            {"int8", DataType::kINT8, DataType::kINT8, DataType::kINT8}};
        for (auto const& tc : typeCases) {
            DataType const inTypes[3] = {tc.a, tc.b, tc.c};
            outType = DataType::kBOOL;
            int32_t const rc = build(p)->getOutputDataTypes(&outType, 1, inTypes, 3);
            Line("output_types").add("label", tc.label).add("rc", rc).add("type", static_cast<int32_t>(outType));
        }
        // k among the device inputs too (tolerated): INT64 or INT32, nothing else.
        for (DataType kType : {DataType::kINT64, DataType::kINT32, DataType::kFLOAT}) {
            DataType const inTypes[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, kType};
            outType = DataType::kBOOL;
            int32_t const rc = build(p)->getOutputDataTypes(&outType, 1, inTypes, 4);
            Line("output_types")
                .add("label", std::string("fp16_k_device_input_") + std::to_string(static_cast<int32_t>(kType)))
                .add("rc", rc)
                .add("type", static_cast<int32_t>(outType));
        }
        logger.takeLastError();

        // supportsFormatCombination over types x formats x positions (pos > 0 given input 0's type),
        // with the three device inputs (documented) and with k among them (tolerated).
        std::vector<DataType> const types = {DataType::kFLOAT, DataType::kHALF, DataType::kINT8, DataType::kINT32,
            DataType::kBOOL, DataType::kUINT8, DataType::kFP8, DataType::kBF16, DataType::kINT64};
        std::vector<TensorFormat> const formats = {TensorFormat::kLINEAR, TensorFormat::kCHW32, TensorFormat::kHWC8};
        auto table = [&](int32_t nbInputs) {
            std::string rows = "[";
            bool first = true;
            for (int32_t pos = 0; pos <= nbInputs; ++pos) {
                for (DataType firstType : types) {
                    for (DataType type : types) {
                        for (TensorFormat format : formats) {
                            DynamicPluginTensorDesc io[5]{};
                            for (auto& d : io) d.desc.format = TensorFormat::kLINEAR;
                            io[0].desc.type = firstType;
                            io[pos].desc.type = type;
                            io[pos].desc.format = format;
                            if (pos == 0 && firstType != type) continue;
                            if (build(p)->supportsFormatCombination(pos, io, nbInputs, 1)) {
                                rows += std::string(first ? "" : ", ") + "[" + std::to_string(pos) + ", " +
                                    std::to_string(static_cast<int32_t>(firstType)) + ", " +
                                    std::to_string(static_cast<int32_t>(type)) + ", " +
                                    std::to_string(static_cast<int32_t>(format)) + "]";
                                first = false;
                            }
                        }
                    }
                }
            }
            return rows + "]";
        };
        DynamicPluginTensorDesc io[5]{};
        Line("formats")
            .raw("supported", table(3))
            .raw("supported_k_device_input", table(4))
            .add("pos_out_of_range", build(p)->supportsFormatCombination(4, io, 3, 1))
            .add("wrong_io_count", build(p)->supportsFormatCombination(0, io, 2, 1));
        delete p;
    }

    // ---- configurePlugin, workspace, onShapeChange --------------------------------------------------
    struct ConfigCase {
        char const* label;
        int32_t k, variant;
        Io min, max;
        DataType type = DataType::kFLOAT;
        DataType valuesType = DataType::kFLOAT;
        DataType outType = DataType::kINT32;
        int32_t nbInputs = 3;     // 4: k among the device inputs too, of type kType
        int64_t kOutMin = -1;     // the output's k range over the profile; -1: the attribute k
        int64_t kOutMax = -1;
        DataType kType = DataType::kINT64;
    };
    Io const small{dims({1, 8, 4, 32}), dims({1, 2, 32, 32}), dims({64, 256})};
    Io const large{dims({3, 8, 4, 100}), dims({3, 2, 100, 32}), dims({64, 256})};
    std::vector<ConfigCase> configCases = {
        {"attention", 16, 2, small, large},
        {"value_norm_fp16", 16, 1, small, large, DataType::kHALF, DataType::kHALF},
        {"contrib", 16, 0, small, large},
        {"empty_batch_profile", 16, 2, {dims({0, 8, 4, 32}), dims({0, 2, 32, 32}), dims({64, 256})}, large},
        {"mixed_types", 16, 2, small, large, DataType::kFLOAT, DataType::kHALF},
        {"int8_inputs", 16, 2, small, large, DataType::kINT8, DataType::kINT8},
        {"output_not_int32", 16, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT64},
        {"k_above_smallest_n", 40, 2, small, large},
        {"heads_not_multiple", 4, 2, {dims({1, 6, 4, 32}), dims({1, 4, 32, 32}), dims({64, 192})},
            {dims({1, 6, 4, 32}), dims({1, 4, 32, 32}), dims({64, 192})}},
        {"two_inputs", 16, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32, 2},
        {"contrib_heads_1000", 4, 0, {dims({1, 1000, 4, 32}), dims({1, 1000, 32, 8}), dims({64, 8000})},
            {dims({1, 1000, 4, 32}), dims({1, 1000, 32, 8}), dims({64, 8000})}},
        // k from the shape input (attribute 0): the profile's k range is the output's second dim.
        {"from_input", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32, 3, 8, 25},
        {"from_input_k_device_input", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32, 4, 8,
            25},
        {"from_input_k_device_input_int32", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32,
            4, 8, 25, DataType::kINT32},
        {"from_input_k_device_input_float", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32,
            4, 8, 25, DataType::kFLOAT},
        {"from_input_smallest_k_above_smallest_n", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT,
            DataType::kINT32, 3, 40, 50},
        {"from_input_largest_k_above_largest_n", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT,
            DataType::kINT32, 3, 8, 120},
        {"from_input_k_zero", 0, 2, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32, 3, 0, 10},
        {"from_input_contrib", 0, 0, small, large, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32, 3, 8, 25},
    };
    for (auto const& cc : configCases) {
        IPluginV3* p = makePlugin(cc.k, cc.variant);
        DynamicPluginTensorDesc in[4] = {dynDesc(cc.min.probs, cc.max.probs, cc.type),
            dynDesc(cc.min.values, cc.max.values, cc.valuesType), dynDesc(cc.min.weight, cc.max.weight, cc.type),
            dynDesc(dims({1}), dims({1}), cc.kType)};
        int64_t const kMin = cc.kOutMin >= 0 ? cc.kOutMin : cc.k;
        int64_t const kMax = cc.kOutMax >= 0 ? cc.kOutMax : cc.k;
        DynamicPluginTensorDesc out[1] = {dynDesc(dims({cc.min.probs.d[0], kMin}), dims({cc.max.probs.d[0], kMax}), cc.outType)};
        logger.takeLastError();
        int32_t const rc = build(p)->configurePlugin(in, cc.nbInputs, out, 1);
        Line("configure").add("label", cc.label).add("rc", rc).add("error", logger.takeLastError());
        delete p;
    }

    struct WorkspaceCase {
        char const* label;
        int32_t variant;
    };
    for (auto const& wc : {WorkspaceCase{"contrib", 0}, WorkspaceCase{"value_norm", 1}, WorkspaceCase{"attention", 2},
             WorkspaceCase{"value_norm_k_from_input", 1}}) {
        // The workspace does not depend on k: a plugin taking k from the shape input needs the same.
        IPluginV3* p = makePlugin(wc.label == std::string("value_norm_k_from_input") ? 0 : 16, wc.variant);
        DynamicPluginTensorDesc in[3] = {dynDesc(small.probs, large.probs, DataType::kFLOAT),
            dynDesc(small.values, large.values, DataType::kFLOAT), dynDesc(small.weight, large.weight, DataType::kFLOAT)};
        DynamicPluginTensorDesc out[1] = {dynDesc(dims({1, 16}), dims({3, 16}), DataType::kINT32)};
        Line("workspace")
            .add("label", wc.label)
            .add("bytes", static_cast<uint64_t>(build(p)->getWorkspaceSize(in, 3, out, 1)))
            .add("max_b", large.probs.d[0])
            .add("max_n", large.probs.d[3])
            .add("h_kv", large.values.d[1]);
        delete p;
    }

    {
        IPluginV3* p = makePlugin(16, 2);
        auto desc = [](Dims const& d, DataType t) {
            PluginTensorDesc x{};
            x.dims = d;
            x.type = t;
            x.format = TensorFormat::kLINEAR;
            return x;
        };
        PluginTensorDesc ok[3] = {desc(dims({2, 8, 4, 96}), DataType::kFLOAT), desc(dims({2, 2, 96, 32}), DataType::kFLOAT),
            desc(dims({64, 256}), DataType::kFLOAT)};
        PluginTensorDesc fewKeys[3] = {desc(dims({2, 8, 4, 8}), DataType::kFLOAT), desc(dims({2, 2, 8, 32}), DataType::kFLOAT),
            desc(dims({64, 256}), DataType::kFLOAT)};
        PluginTensorDesc out[1] = {desc(dims({2, 16}), DataType::kINT32)};
        // Every shape: k is the output's second dim (the attribute, or the shape input's value).
        struct ShapeChangeCase {
            char const* label;
            int32_t k; // the attribute
            PluginTensorDesc const* in;
            int64_t outK;
            int32_t nbInputs = 3;
        };
        PluginTensorDesc okWithK[4] = {ok[0], ok[1], ok[2], desc(dims({1}), DataType::kINT64)};
        std::vector<ShapeChangeCase> const changes = {
            {"attribute", 16, ok, 16},
            {"attribute_k_above_n", 16, fewKeys, 16},
            {"attribute_output_disagrees", 16, ok, 12},
            {"from_input", 0, ok, 40},
            {"from_input_k_device_input", 0, okWithK, 40, 4},
            {"from_input_k_equals_n", 0, ok, 96},
            {"from_input_k_above_n", 0, ok, 100},
            {"from_input_k_zero", 0, ok, 0},
        };
        for (auto const& c : changes) {
            IPluginV3* q = makePlugin(c.k, 2);
            PluginTensorDesc o[1] = {desc(dims({2, c.outK}), DataType::kINT32)};
            logger.takeLastError();
            int32_t const rc = runtime(q)->onShapeChange(c.in, c.nbInputs, o, 1);
            Line("on_shape_change").add("label", c.label).add("rc", rc).add("error", logger.takeLastError());
            delete q;
        }

        // ---- enqueue ---------------------------------------------------------------------------------
        PluginTensorDesc empty[3] = {desc(dims({0, 8, 4, 96}), DataType::kFLOAT), desc(dims({0, 2, 96, 32}), DataType::kFLOAT),
            desc(dims({64, 256}), DataType::kFLOAT)};
        int32_t const rcEmpty = runtime(p)->enqueue(empty, out, nullptr, nullptr, nullptr, nullptr);
        Line("enqueue").add("label", "empty_batch").add("rc", rcEmpty).add("error", logger.takeLastError());

        void const* inputs[3] = {nullptr, nullptr, nullptr};
        void* outputs[1] = {nullptr};
        int32_t const rcNoWorkspace = runtime(p)->enqueue(ok, out, inputs, outputs, nullptr, nullptr);
        Line("enqueue").add("label", "no_workspace").add("rc", rcNoWorkspace).add("error", logger.takeLastError());

        // k read from the output's dims: a k the inputs cannot hold fails before any CUDA call.
        {
            IPluginV3* q = makePlugin(0, 2);
            PluginTensorDesc tooMany[1] = {desc(dims({2, 200}), DataType::kINT32)};
            static char someWorkspace[16];
            void* outBuf[1] = {someWorkspace};
            int32_t const rc = runtime(q)->enqueue(ok, tooMany, inputs, outBuf, someWorkspace, nullptr);
            Line("enqueue").add("label", "k_from_output_above_n").add("rc", rc).add("error", logger.takeLastError());
            delete q;
        }

        // A launch: real buffers where a GPU exists (expect success), else it must fail cleanly with
        // CUDA's own error text. All-zero inputs give equal scores: the kept indices are then the
        // lowest k, 0..k-1 per row, with k the output's second dim.
        struct LaunchCase {
            char const* label;
            int32_t k, variant;
        };
        for (auto const& lc : {LaunchCase{"launch_contrib", 16, 0}, LaunchCase{"launch_attention", 16, 2},
                 LaunchCase{"launch_attention_k_from_input", 0, 2}}) {
            IPluginV3* q = makePlugin(lc.k, lc.variant);
            size_t const workspaceBytes = 1 << 20;
            void* buffers[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
            size_t const sizes[5] = {2 * 8 * 4 * 96 * 4, 2 * 2 * 96 * 32 * 4, 64 * 256 * 4, 2 * 16 * 4, workspaceBytes};
            bool allocated = deviceCount > 0;
            for (int i = 0; allocated && i < 5; ++i) {
                allocated = cudaMalloc(&buffers[i], sizes[i]) == cudaSuccess &&
                    cudaMemset(buffers[i], 0, sizes[i]) == cudaSuccess;
            }
            static char fakeWorkspace[16];
            void const* in[3] = {buffers[0], buffers[1], buffers[2]};
            void* outBuf[1] = {buffers[3]};
            int32_t const rc = runtime(q)->enqueue(ok, out, in, outBuf, allocated ? buffers[4] : fakeWorkspace, nullptr);
            cudaError_t const syncErr = allocated ? cudaStreamSynchronize(nullptr) : cudaSuccess;
            std::string kept = "null";
            int32_t host[2 * 16] = {};
            if (allocated && rc == 0 && syncErr == cudaSuccess &&
                cudaMemcpy(host, buffers[3], sizeof host, cudaMemcpyDeviceToHost) == cudaSuccess) {
                kept = "[";
                for (int i = 0; i < 2 * 16; ++i) kept += (i ? ", " : "") + std::to_string(host[i]);
                kept += "]";
            }
            Line("enqueue")
                .add("label", lc.label)
                .add("rc", rc)
                .add("on_gpu", allocated)
                .add("sync_error", cudaGetErrorString(syncErr))
                .raw("kept", kept)
                .add("error", logger.takeLastError());
            for (void* b : buffers)
                if (b != nullptr) cudaFree(b);
            delete q;
        }
        delete p;
    }

    // ---- the contrib kernel's head limit for known opt-in shared-memory sizes ---------------------
    for (size_t kib : {99, 163, 227}) {
        Line("max_heads").add("smem_kib", static_cast<uint64_t>(kib)).add("heads",
            static_cast<int32_t>(capa_contrib_max_heads(kib * 1024)));
    }
    return 0;
}
