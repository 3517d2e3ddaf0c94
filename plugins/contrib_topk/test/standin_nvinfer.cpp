// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// A test double of libnvinfer's two C entry points the self-registering plugin library looks up
// (getPluginRegistry, getLogger), built as a library with TensorRT's soname (libnvinfer.so.N) in
// a test-only folder. The glue harness loads it RTLD_LOCAL, as the tensorrt wheel loads the real
// one, then loads libcapa_contrib_topk_plugin_autoreg.so like ctypes.CDLL does. Built only with
// -DCAPA_BUILD_PLUGIN_TESTS=ON, never installed; it has no builder, network or runtime.
#include "trt_standins.h"

namespace {
capa_test::StandInLogger gLogger;
capa_test::StandInRegistry gRegistry;
} // namespace

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginRegistry* getPluginRegistry() noexcept {
    return &gRegistry;
}

extern "C" __attribute__((visibility("default"))) nvinfer1::ILogger* getLogger() noexcept { return &gLogger; }
