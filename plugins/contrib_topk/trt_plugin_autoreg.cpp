// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// libcapa_contrib_topk_plugin_autoreg.so: the variant that registers its creator when it is
// loaded, for loaders that only dlopen a library -- ctypes.CDLL, which Polygraphy's LoadPlugins /
// --plugins use. It exports nothing (in particular no getCreators: IPluginRegistry::loadLibrary
// on it would register the creator a second time and fail); use libcapa_contrib_topk_plugin.so
// there and in plugins_to_serialize.
//
// TensorRT's getPluginRegistry / getLogger are looked up at load time in the libnvinfer the
// process already has, by soname, instead of being left undefined: the tensorrt wheel loads
// libnvinfer.so.N with RTLD_LOCAL, so undefined symbols would not resolve ("undefined symbol:
// getPluginRegistry" from ctypes.CDLL), and a DT_NEEDED on libnvinfer would pin one install.
#include "trt_plugin.h"

#include <NvInferVersion.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdio>

#define CAPA_STRINGIFY_(x) #x
#define CAPA_STRINGIFY(x) CAPA_STRINGIFY_(x)

namespace capa {
namespace {

// The soname of the TensorRT these headers describe, e.g. libnvinfer.so.11.
constexpr char kNvinferSoname[] = "libnvinfer.so." CAPA_STRINGIFY(NV_TENSORRT_MAJOR);

using GetPluginRegistryFn = nvinfer1::IPluginRegistry* (*)() noexcept;
using GetLoggerFn = nvinfer1::ILogger* (*)() noexcept;

std::atomic<GetLoggerFn> gGetLogger{nullptr};

// The library's creator, registered once per load.
class SelfRegistration {
public:
    SelfRegistration() noexcept {
        // Already loaded (import tensorrt, any RTLD_* mode)? RTLD_NOLOAD matches it by soname.
        void* nvinfer = dlopen(kNvinferSoname, RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
        if (nvinfer == nullptr) nvinfer = dlopen(kNvinferSoname, RTLD_LAZY | RTLD_LOCAL);
        if (nvinfer == nullptr) {
            std::fprintf(stderr,
                "[capa::CapaContribTopK] %s is neither loaded nor loadable (%s): CapaContribTopK is not "
                "registered. Import tensorrt before loading this library, or load "
                "libcapa_contrib_topk_plugin.so with IPluginRegistry::loadLibrary.\n",
                kNvinferSoname, dlerror());
            return;
        }
        // The handle is kept open: TensorRT must outlive the creator it holds.
        auto getRegistry = reinterpret_cast<GetPluginRegistryFn>(dlsym(nvinfer, "getPluginRegistry"));
        gGetLogger.store(reinterpret_cast<GetLoggerFn>(dlsym(nvinfer, "getLogger")));
        nvinfer1::IPluginRegistry* registry = getRegistry != nullptr ? getRegistry() : nullptr;
        if (registry == nullptr) {
            std::fprintf(stderr, "[capa::CapaContribTopK] %s has no plugin registry: CapaContribTopK is not registered\n",
                kNvinferSoname);
            return;
        }
        if (!registry->registerCreator(mCreator, kPluginNamespace)) {
            std::fprintf(stderr,
                "[capa::CapaContribTopK] the plugin registry refused %s::%s version %s (already registered, "
                "e.g. by libcapa_contrib_topk_plugin.so through loadLibrary?)\n",
                kPluginNamespace, kPluginName, kPluginVersion);
        }
    }

private:
    ContribTopKPluginCreator mCreator;
};

SelfRegistration gSelfRegistration;

} // namespace

nvinfer1::ILogger* pluginLogger() noexcept {
    GetLoggerFn const getLogger = gGetLogger.load();
    return getLogger != nullptr ? getLogger() : nullptr;
}

} // namespace capa
