// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// Entry points of libcapa_contrib_topk_plugin.so, the library TensorRT loads itself:
// IPluginRegistry::loadLibrary (Python: trt.get_plugin_registry().load_library), trtexec
// --dynamicPlugins, and the lean runtime when the library is serialised into a version-compatible
// engine (IBuilderConfig::setPluginsToSerialize). Laid out like NVIDIA's plugin/vc/vfcCommon.cpp:
// the library exports getCreators and setLoggerFinder only, registers nothing by itself (TensorRT
// registers what getCreators returns; a second registration would make loadLibrary fail), and
// refers to no libnvinfer symbol, so it loads in any process -- full, lean or dispatch runtime.
#include "trt_plugin.h"

#include <mutex>

namespace capa {
namespace {

// TensorRT calls setLoggerFinder from the thread that loads the library while other threads may
// already log (a plugin of another engine): every access goes through the mutex.
class ThreadSafeLoggerFinder {
public:
    // The first non-null finder is kept, as in NVIDIA's version-compatible plugin library: it is
    // owned by TensorRT and outlives the plugins it serves.
    void set(nvinfer1::ILoggerFinder* finder) noexcept {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr) mFinder = finder;
    }

    nvinfer1::ILogger* logger() noexcept {
        std::lock_guard<std::mutex> lock(mMutex);
        return mFinder != nullptr ? mFinder->findLogger() : nullptr;
    }

private:
    std::mutex mMutex;
    nvinfer1::ILoggerFinder* mFinder = nullptr;
};

ThreadSafeLoggerFinder gLoggerFinder;

} // namespace

nvinfer1::ILogger* pluginLogger() noexcept { return gLoggerFinder.logger(); }

} // namespace capa

// TENSORRTAPI is empty outside TensorRT's own build; the linker version script (exports_vc.map)
// is what makes these two the library's only exported symbols.
#define CAPA_PLUGIN_EXPORT __attribute__((visibility("default")))

extern "C" CAPA_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    capa::gLoggerFinder.set(finder);
}

extern "C" CAPA_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static capa::ContribTopKPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
