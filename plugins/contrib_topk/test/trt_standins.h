// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// Test doubles of the TensorRT interfaces the plugin calls (logger, logger finder, plugin
// registry, dimension expressions), written against TensorRT's public headers. They let the glue
// harness drive the IPluginV3 methods where no TensorRT runtime exists; they are built only with
// -DCAPA_BUILD_PLUGIN_TESTS=ON and are never installed. The registry copies what
// IPluginRegistry's documentation promises: registerCreator refuses a creator already registered,
// loadLibrary dlopens a library, hands it a logger finder, registers what getCreators returns and
// fails when one of them is already registered.
#ifndef CAPA_TRT_STANDINS_H
#define CAPA_TRT_STANDINS_H

#include <NvInfer.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace capa_test {

class StandInLogger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
        std::lock_guard<std::mutex> lock(mMutex);
        mMessages.emplace_back(severity, msg != nullptr ? msg : "");
    }
    // The last message at kERROR or worse ("" when none); clears the record.
    std::string takeLastError() {
        std::lock_guard<std::mutex> lock(mMutex);
        std::string last;
        for (auto const& m : mMessages)
            if (m.first <= Severity::kERROR) last = m.second;
        mMessages.clear();
        return last;
    }

private:
    std::mutex mMutex;
    std::vector<std::pair<Severity, std::string>> mMessages;
};

class StandInLoggerFinder final : public nvinfer1::ILoggerFinder {
public:
    explicit StandInLoggerFinder(nvinfer1::ILogger* logger) : mLogger(logger) {}
    ~StandInLoggerFinder() override = default;
    nvinfer1::ILogger* findLogger() override { return mLogger; }

private:
    nvinfer1::ILogger* mLogger;
};

struct CreatorKey {
    std::string name, version, nameSpace;
    bool operator==(CreatorKey const& o) const { return name == o.name && version == o.version && nameSpace == o.nameSpace; }
};

inline CreatorKey keyOf(nvinfer1::IPluginCreatorInterface& creator) {
    if (std::strcmp(creator.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) return {"?", "?", "?"};
    auto& v3 = static_cast<nvinfer1::IPluginCreatorV3One&>(creator);
    return {v3.getPluginName(), v3.getPluginVersion(), v3.getPluginNamespace()};
}

class StandInRegistry final : public nvinfer1::IPluginRegistry {
public:
    using LoaderFn = nvinfer1::IPluginCreatorInterface* const* (*)(int32_t&);
    using SetLoggerFinderFn = void (*)(nvinfer1::ILoggerFinder*);

    explicit StandInRegistry(nvinfer1::ILoggerFinder* finder = nullptr) : mFinder(finder) {}
    ~StandInRegistry() noexcept override = default;

    void setErrorRecorder(nvinfer1::IErrorRecorder* const) noexcept override {}
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}

    PluginLibraryHandle loadLibrary(nvinfer1::AsciiChar const* pluginPath) noexcept override {
        void* handle = dlopen(pluginPath, RTLD_LAZY | RTLD_LOCAL);
        if (handle == nullptr) {
            lastLoadError = dlerror();
            return nullptr;
        }
        auto getCreators = reinterpret_cast<LoaderFn>(dlsym(handle, "getCreators"));
        auto setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(handle, "setLoggerFinder"));
        if (getCreators == nullptr) {
            lastLoadError = "no getCreators";
            return nullptr;
        }
        if (setLoggerFinder != nullptr && mFinder != nullptr) setLoggerFinder(mFinder);
        int32_t count = 0;
        nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
        for (int32_t i = 0; i < count; ++i) {
            if (!registerCreator(*creators[i], keyOf(*creators[i]).nameSpace.c_str())) {
                lastLoadError = "a creator of the library is already registered";
                return nullptr;
            }
        }
        return handle;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}

    bool registerCreator(nvinfer1::IPluginCreatorInterface& creator, nvinfer1::AsciiChar const* const) noexcept override {
        std::lock_guard<std::mutex> lock(mMutex);
        ++registerCalls;
        CreatorKey const key = keyOf(creator);
        for (auto const& entry : mCreators)
            if (entry.first == key) return false;
        mCreators.emplace_back(key, &creator);
        return true;
    }
    nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override {
        mAll.clear();
        for (auto const& entry : mCreators) mAll.push_back(entry.second);
        *numCreators = static_cast<int32_t>(mAll.size());
        return mAll.empty() ? nullptr : mAll.data();
    }
    nvinfer1::IPluginCreatorInterface* getCreator(nvinfer1::AsciiChar const* const name,
        nvinfer1::AsciiChar const* const version, nvinfer1::AsciiChar const* const nameSpace) noexcept override {
        CreatorKey const key{name, version, nameSpace != nullptr ? nameSpace : ""};
        for (auto const& entry : mCreators)
            if (entry.first == key) return entry.second;
        return nullptr;
    }
    bool deregisterCreator(nvinfer1::IPluginCreatorInterface const&) noexcept override { return false; }
    nvinfer1::IPluginResource* acquirePluginResource(nvinfer1::AsciiChar const*, nvinfer1::IPluginResource*) noexcept override {
        return nullptr;
    }
    int32_t releasePluginResource(nvinfer1::AsciiChar const*) noexcept override { return -1; }
    nvinfer1::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override {
        return getAllCreators(numCreators);
    }

    std::vector<CreatorKey> keys() const {
        std::vector<CreatorKey> out;
        for (auto const& entry : mCreators) out.push_back(entry.first);
        return out;
    }

    int registerCalls = 0;
    std::string lastLoadError;

private:
    nvinfer1::ILoggerFinder* mFinder;
    std::mutex mMutex;
    std::vector<std::pair<CreatorKey, nvinfer1::IPluginCreatorInterface*>> mCreators;
    mutable std::vector<nvinfer1::IPluginCreatorInterface*> mAll;
};

// IDimensionExpr / IExprBuilder forward to an apiv implementation object (mImpl); these doubles
// are that implementation. A symbolic expression is "not constant" (a dynamic dimension).
class StandInExpr final : public nvinfer1::IDimensionExpr {
public:
    StandInExpr(bool constant, int64_t value) : mImplObject(constant, value) { mImpl = &mImplObject; }

private:
    struct Impl final : nvinfer1::apiv::VDimensionExpr {
        Impl(bool c, int64_t v) : constant(c), value(v) {}
        bool isConstant() const override { return constant; }
        int64_t getConstantValue() const override { return constant ? value : INT64_MIN; }
        bool isSizeTensor() const override { return false; }
        bool constant;
        int64_t value;
    };
    Impl mImplObject;
};

class StandInExprBuilder final : public nvinfer1::IExprBuilder {
public:
    StandInExprBuilder() : mImplObject(this) { mImpl = &mImplObject; }
    ~StandInExprBuilder() noexcept override = default;

    nvinfer1::IDimensionExpr const* make(bool constant, int64_t value) {
        mExprs.push_back(std::make_unique<StandInExpr>(constant, value));
        return mExprs.back().get();
    }

private:
    struct Impl final : nvinfer1::apiv::VExprBuilder {
        explicit Impl(StandInExprBuilder* owner) : owner(owner) {}
        nvinfer1::IDimensionExpr const* constant(int64_t value) override { return owner->make(true, value); }
        nvinfer1::IDimensionExpr const* operation(
            nvinfer1::DimensionOperation, nvinfer1::IDimensionExpr const&, nvinfer1::IDimensionExpr const&) override {
            return owner->make(false, 0);
        }
        nvinfer1::IDimensionExpr const* declareSizeTensor(
            int32_t, nvinfer1::IDimensionExpr const&, nvinfer1::IDimensionExpr const&) override {
            return owner->make(false, 0);
        }
        StandInExprBuilder* owner;
    };
    Impl mImplObject;
    std::vector<std::unique_ptr<StandInExpr>> mExprs;
};

} // namespace capa_test

#endif // CAPA_TRT_STANDINS_H
