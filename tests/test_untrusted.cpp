// --untrusted: a backing file or data file name taken from an image is followed only when it is
// relative, stays inside the directory of the image naming it (after `..` and symlinks) and
// names a regular file. Every escaping reference is built with qemu-img at test
// time and refused by every command that opens images, by the library, the C API and both
// resolution methods (openat2 and the O_NOFOLLOW walk); references that stay inside still
// read exactly as qemu-img reads them; without the flag nothing changes.
#include "support.hpp"

#include "references.hpp" // white-box: open_confined and its two resolution methods

#include <qcowmap/check.hpp>
#include <qcowmap/image.hpp>
#include <qcowmap/qcow2.h>
#include <qcowmap/references.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace qcowmap {
namespace {

namespace fs = std::filesystem;
namespace qt = qcowmap::test;
using qt::cli;
using qt::q;

/// A qcow2 overlay at `image` whose backing file name is `name` (format `format`), created
/// without opening the backing file (-u), so that any name can be stored.
void overlay(const fs::path& image, const std::string& name, const std::string& format = "raw",
             const std::string& size = "1M") {
    qt::run_ok("qemu-img create -q -f qcow2 -u -b " + qt::shell_quote(name) + " -F " + format +
               " " + q(image) + " " + size);
}

/// A raw file of `size` bytes filled with `fill`.
void raw_file(const fs::path& path, std::size_t size, unsigned char fill) {
    qt::write_file(path, std::vector<std::byte>(size, std::byte{fill}));
}

/// A UNIX socket bound at `path` (left behind as a socket file).
void make_socket(const fs::path& path) {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    ASSERT_LT(path.string().size(), sizeof address.sun_path);
    std::strcpy(address.sun_path, path.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
    ::close(fd);
}

/// Every command that opens an image, as it is run on `image` with --untrusted (the output
/// file of convert lives in `out_dir`). `info` without --backing-chain and `bitmaps` describe
/// the image itself and do not open its backing file; `bitmaps` opens its data file, `info`
/// never needs it (it says whether it was found).
std::vector<std::string> commands(const fs::path& image, const fs::path& out_dir, bool data_file) {
    const std::string i = q(image);
    std::vector<std::string> out = {
        "map --untrusted " + i,   "map --untrusted --output=json " + i,
        "cat --untrusted " + i,   "convert --untrusted " + i + " " + q(out_dir / "out.raw"),
        "hash --untrusted " + i,  "hash --untrusted --block-size=64k " + i,
        "check --untrusted " + i, "compare --untrusted " + i + " " + i,
    };
    if (data_file) {
        out.push_back("bitmaps --untrusted " + i);
    } else {
        out.push_back("info --untrusted --backing-chain " + i);
        out.push_back("info --untrusted --backing-chain --json " + i);
    }
    return out;
}

/// The command fails with one line `qcowmap: IMAGE: WHAT 'NAME' WHY (--untrusted)` and the exit
/// status of a failed open (2 for compare, as qemu-img compare; 1 otherwise).
testing::AssertionResult refused(const std::string& command, const fs::path& image,
                                 const std::string& expected) {
    const qt::CommandResult r = qt::run("cd / && " + cli() + " " + command);
    const int want = command.starts_with("compare") ? 2 : 1;
    const std::string line = "qcowmap: " + image.string() + ": " + expected + " (--untrusted)\n";
    if (r.exit_code != want || r.err != line || !r.out.empty()) {
        return testing::AssertionFailure() << "`" << command << "` exited " << r.exit_code
                                           << " (want " << want << "), stderr:\n"
                                           << r.err << "want:\n"
                                           << line << "stdout: " << r.out.substr(0, 200);
    }
    return testing::AssertionSuccess();
}

struct Escape {
    std::string name;     ///< test case
    std::string expected; ///< the message after "qcowmap: IMAGE: "
};

/// The escapes, each an overlay in `dir` whose backing or data file reference
/// leaves the directory or names something that is not a regular file.
std::vector<std::pair<fs::path, Escape>> build_escapes(const qt::TempDir& dir,
                                                       const qt::TempDir& outside) {
    std::vector<std::pair<fs::path, Escape>> out;
    const fs::path secret = outside / "secret.raw";
    raw_file(secret, 1 << 20, 0x5e);

    // An external data file named by absolute path: without the flag, cat prints its bytes.
    const fs::path data_image = dir / "data.qcow2";
    const fs::path data_file = outside / "data-secret.raw";
    qt::run_ok("qemu-img create -q -f qcow2 -o data_file=" + q(data_file) + ",data_file_raw=on " +
               q(data_image) + " 1M");
    raw_file(data_file, 1 << 20, 0x5e);
    out.push_back(
        {data_image,
         {"absolute-data-file", "data file '" + data_file.string() + "' is an absolute path"}});

    const std::vector<std::pair<std::string, std::string>> backings = {
        {"/etc/hostname", "is an absolute path"},
        {"/dev/zero", "is an absolute path"},
        {"/proc/self/environ", "is an absolute path"},
        {"../outside.raw", "leaves the image's directory"},
        {"sub/../../outside.raw", "leaves the image's directory"},
        {"link-out.raw", "leaves the image's directory"},
        {"link-abs.raw", "leaves the image's directory"},
        {"fifo", "is a FIFO, not a regular file"},
        {"sock", "is a socket, not a regular file"},
        {"sub", "is a directory, not a regular file"},
        {"link-zero", "leaves the image's directory"},
    };
    fs::create_directories(dir / "sub");
    fs::create_symlink(secret, dir / "link-abs.raw");
    fs::create_symlink(fs::relative(secret, dir.path()), dir / "link-out.raw");
    fs::create_symlink("/dev/zero", dir / "link-zero");
    EXPECT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
    make_socket(dir / "sock");
    int n = 0;
    for (const auto& [name, why] : backings) {
        const fs::path image = dir / ("backing-" + std::to_string(n++) + ".qcow2");
        overlay(image, name);
        out.push_back({image, {"backing " + name, "backing file '" + name + "' " + why}});
    }
    return out;
}

TEST(Untrusted, EveryEscapeIsRefusedByEveryCommand) {
    qt::TempDir dir, outside, out_dir;
    for (const auto& [image, escape] : build_escapes(dir, outside)) {
        SCOPED_TRACE(escape.name);
        for (const std::string& command :
             commands(image, out_dir.path(), escape.name == "absolute-data-file")) {
            EXPECT_TRUE(refused(command, image, escape.expected));
        }
        EXPECT_FALSE(fs::exists(out_dir / "out.raw")) << "convert wrote output it should not";
        if (escape.name == "absolute-data-file") {
            // info reads only the header: it says the data file was refused, and why.
            const qt::CommandResult info =
                qt::run("cd / && " + cli() + " info --untrusted --backing-chain " + q(image));
            EXPECT_EQ(info.exit_code, 0) << info.err;
            EXPECT_NE(info.out.find("data file found: no (" + escape.expected + " (untrusted))"),
                      std::string::npos)
                << info.out;
        }
    }
}

TEST(Untrusted, WithoutTheFlagReferencesAreFollowedAsQemuDoes) {
    // The disclosure the flag prevents: an absolute data file and an absolute backing file are
    // read as the disk, byte for byte what qemu-img reads.
    qt::TempDir dir, outside;
    for (const auto& [image, escape] : build_escapes(dir, outside)) {
        if (escape.name != "absolute-data-file" && escape.name != "backing /etc/hostname" &&
            escape.name != "backing link-out.raw")
            continue;
        SCOPED_TRACE(escape.name);
        const qt::CommandResult ours = qt::run("cd / && " + cli() + " cat " + q(image));
        ASSERT_EQ(ours.exit_code, 0) << ours.err;
        const std::vector<std::byte> oracle = qt::qemu_raw(image, outside);
        ASSERT_EQ(ours.out.size(), oracle.size());
        EXPECT_TRUE(std::equal(oracle.begin(), oracle.end(),
                               reinterpret_cast<const std::byte*>(ours.out.data())));
        if (escape.name != "backing /etc/hostname") {
            EXPECT_EQ(static_cast<unsigned char>(ours.out[0]), 0x5e) << "the secret shows";
        }
    }
}

TEST(Untrusted, ReferencesInsideTheDirectoryStillRead) {
    qt::TempDir dir;
    fs::create_directories(dir / "sub");
    qt::make_image(dir / "sub" / "base.qcow2", "cluster_size=4k", "1M",
                   {"write -P 0x11 0 64k", "write -P 0x12 512k 8k"});
    raw_file(dir / "base.raw", 1 << 20, 0x21);
    fs::create_symlink("base.raw", dir / "link-in.raw");
    fs::create_symlink("sub/base.qcow2", dir / "link-in.qcow2");
    // A middle layer in sub/ that names a file beside it and one that goes through `..` back
    // into its own directory.
    qt::run_ok("qemu-img create -q -f qcow2 -u -b base.qcow2 -F qcow2 " +
               q(dir / "sub" / "mid.qcow2") + " 1M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -P 0x13 32k 4k' " + q(dir / "sub" / "mid.qcow2") +
               " >/dev/null");
    struct Case {
        std::string name, format;
    };
    const std::vector<Case> cases = {
        {"sub/base.qcow2", "qcow2"},     {"sub/../sub/base.qcow2", "qcow2"},
        {"./sub/./base.qcow2", "qcow2"}, {"base.raw", "raw"},
        {"link-in.raw", "raw"},          {"link-in.qcow2", "qcow2"},
        {"sub/mid.qcow2", "qcow2"},      {"sub//mid.qcow2", "qcow2"},
    };
    int n = 0;
    for (const Case& c : cases) {
        SCOPED_TRACE(c.name);
        const fs::path image = dir / ("top-" + std::to_string(n++) + ".qcow2");
        overlay(image, c.name, c.format);
        qt::run_ok("qemu-io -f qcow2 -c 'write -P 0x31 4k 4k' " + q(image) + " >/dev/null");
        const qt::CommandResult ours = qt::run("cd / && " + cli() + " cat --untrusted " + q(image));
        ASSERT_EQ(ours.exit_code, 0) << ours.err;
        const std::vector<std::byte> oracle = qt::qemu_raw(image, dir);
        ASSERT_EQ(ours.out.size(), oracle.size());
        EXPECT_TRUE(std::equal(oracle.begin(), oracle.end(),
                               reinterpret_cast<const std::byte*>(ours.out.data())));
        const qt::CommandResult check =
            qt::run("cd / && " + cli() + " check --untrusted " + q(image));
        EXPECT_EQ(check.exit_code, 0) << check.err;
    }
}

TEST(Untrusted, EachLayerIsConfinedToItsOwnDirectory) {
    // top.qcow2 -> sub/mid.qcow2 -> ../base.qcow2: the last name goes back up to the top's
    // directory, which is outside the directory of the image naming it (sub/).
    qt::TempDir dir;
    fs::create_directories(dir / "sub");
    qt::make_image(dir / "base.qcow2", "", "1M", {"write -P 0x41 0 64k"});
    qt::run_ok("qemu-img create -q -f qcow2 -u -b ../base.qcow2 -F qcow2 " +
               q(dir / "sub" / "mid.qcow2") + " 1M");
    overlay(dir / "top.qcow2", "sub/mid.qcow2", "qcow2");
    const qt::CommandResult trusted = qt::run(cli() + " cat " + q(dir / "top.qcow2"));
    ASSERT_EQ(trusted.exit_code, 0) << trusted.err;
    EXPECT_TRUE(refused("cat --untrusted " + q(dir / "top.qcow2"), dir / "top.qcow2",
                        "backing file '../base.qcow2' leaves the image's directory"));
    OpenOptions options;
    options.untrusted = true;
    auto image = Image::open(dir / "top.qcow2", options);
    ASSERT_FALSE(image);
    EXPECT_EQ(image.error().code, ErrorCode::unsupported_feature);
    EXPECT_EQ(image.error().message,
              "backing file '../base.qcow2' leaves the image's directory (untrusted)");
    EXPECT_EQ(image.error().refusal, Refusal::untrusted);
    EXPECT_EQ(image.error().origin, ErrorOrigin::backing);
    EXPECT_EQ(image.error().depth, 2u); // the backing file of sub/mid.qcow2
    EXPECT_EQ(image.error().path, "../base.qcow2");
}

TEST(Untrusted, NamesTheCallerGivesAreTrusted) {
    qt::TempDir dir, outside;
    raw_file(outside / "elsewhere.raw", 1 << 20, 0x77);
    overlay(dir / "top.qcow2", "/etc/hostname");
    // --backing is not a path option: the library's backing_file override is.
    OpenOptions options;
    options.untrusted = true;
    options.backing_file = outside / "elsewhere.raw";
    options.backing_format = "raw";
    auto image = Image::open(dir / "top.qcow2", options);
    ASSERT_TRUE(image) << image.error().message;
    std::vector<std::byte> first(16);
    ASSERT_TRUE(image->read(first, 0));
    EXPECT_EQ(first[0], std::byte{0x77});

    // --data-file for an image whose own data file name is absolute.
    const fs::path data_image = dir / "data.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -o data_file=" + q(outside / "d.raw") +
               ",data_file_raw=on " + q(data_image) + " 1M");
    raw_file(outside / "d.raw", 1 << 20, 0x66);
    const qt::CommandResult r = qt::run(
        cli() + " cat --untrusted --data-file=" + q(outside / "d.raw") + " " + q(data_image));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_EQ(r.out.size(), 1u << 20);
    EXPECT_EQ(static_cast<unsigned char>(r.out[0]), 0x66);
}

TEST(Untrusted, LibraryCApiAndCheckRefuseAlike) {
    qt::TempDir dir;
    overlay(dir / "top.qcow2", "../x.raw");
    const std::string message = "backing file '../x.raw' leaves the image's directory";
    OpenOptions options;
    options.untrusted = true;
    auto image = Image::open(dir / "top.qcow2", options);
    ASSERT_FALSE(image);
    EXPECT_EQ(image.error().message, message + std::string(kUntrustedRefusalMark));
    // BackingMode::none opens no backing file, so there is nothing to refuse.
    options.backing = BackingMode::none;
    EXPECT_TRUE(Image::open(dir / "top.qcow2", options));

    CheckOptions check;
    check.untrusted = true;
    auto checked = check_image(dir / "top.qcow2", check);
    ASSERT_FALSE(checked);
    EXPECT_EQ(checked.error().message, message + std::string(kUntrustedRefusalMark));

    qcowmap_open_options c_options{};
    c_options.untrusted = 1;
    const char* error = nullptr;
    errno = 0;
    struct qcow2* q = qcowmap_open((dir / "top.qcow2").c_str(), &c_options, &error);
    EXPECT_EQ(q, nullptr);
    EXPECT_EQ(errno, ENOTSUP);
    ASSERT_NE(error, nullptr);
    EXPECT_EQ(std::string(error), message + std::string(kUntrustedRefusalMark));
    if (q)
        qcow2_close(q);
}

TEST(Untrusted, MissingFilesReadAsBeforeNotAsRefusals) {
    qt::TempDir dir;
    overlay(dir / "top.qcow2", "nowhere.raw");
    const qt::CommandResult r = qt::run(cli() + " cat --untrusted " + q(dir / "top.qcow2"));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + (dir / "top.qcow2").string() + ": backing file " +
                         (dir / "nowhere.raw").string() + ": No such file or directory\n");
}

TEST(Untrusted, BothResolutionMethodsAgree) {
    // openat2(RESOLVE_BENEATH) and the component walk used where the kernel lacks it give the
    // same verdict on every name, and only the walk is used when asked.
    qt::TempDir dir, outside;
    fs::create_directories(dir / "sub" / "deeper");
    raw_file(dir / "sub" / "deeper" / "f.raw", 512, 1);
    raw_file(outside / "o.raw", 512, 2);
    fs::create_symlink("deeper/f.raw", dir / "sub" / "rel-in");
    fs::create_symlink("../sub/deeper/f.raw", dir / "sub" / "updown");
    fs::create_symlink("../../outside-link", dir / "sub" / "rel-out");
    fs::create_symlink((outside / "o.raw").string(), dir / "abs");
    fs::create_symlink("loop2", dir / "loop1");
    fs::create_symlink("loop1", dir / "loop2");
    fs::create_symlink("/proc/self/root/etc/hostname", dir / "magic");
    ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
    const fs::path image = dir / "vm.qcow2";
    struct Case {
        std::string name;
        bool opens;
        std::string why; // expected refusal (empty: opens, or an io_error)
    };
    const std::vector<Case> cases = {
        {"sub/deeper/f.raw", true, ""},
        {"sub/rel-in", true, ""},
        {"sub/updown", true, ""},
        {"sub/deeper/../../sub/deeper/f.raw", true, ""},
        {"sub/rel-out", false, "leaves the image's directory"},
        {"abs", false, "leaves the image's directory"},
        {"..", false, "leaves the image's directory"},
        {"sub/../..", false, "leaves the image's directory"},
        {"/etc/hostname", false, "is an absolute path"},
        {"fifo", false, "is a FIFO, not a regular file"},
        {"sub", false, "is a directory, not a regular file"},
        {"loop1", false, "goes through a symlink loop or a /proc magic link"},
        {"magic", false, "leaves the image's directory"},
        {"", false, "is an empty name"},
        {"missing.raw", false, ""},
    };
    for (const Case& c : cases) {
        for (auto method : {detail::ConfineMethod::automatic, detail::ConfineMethod::walk}) {
            SCOPED_TRACE(c.name + (method == detail::ConfineMethod::walk ? " (walk)" : ""));
            auto opened = detail::open_confined(image, c.name, ErrorOrigin::backing, method);
            if (c.opens) {
                ASSERT_TRUE(opened) << opened.error().message;
                struct stat st {};
                ASSERT_EQ(::fstat(opened->fd, &st), 0);
                EXPECT_TRUE(S_ISREG(st.st_mode));
                EXPECT_EQ(st.st_size, 512);
                EXPECT_EQ(opened->path, dir / c.name);
                ::close(opened->fd);
            } else if (!c.why.empty()) {
                ASSERT_FALSE(opened);
                EXPECT_EQ(opened.error().code, ErrorCode::unsupported_feature);
                EXPECT_EQ(opened.error().message,
                          "backing file '" + c.name + "' " + c.why + " (untrusted)");
                EXPECT_EQ(opened.error().refusal, Refusal::untrusted);
                EXPECT_EQ(opened.error().origin, ErrorOrigin::backing);
            } else {
                ASSERT_FALSE(opened);
                EXPECT_EQ(opened.error().code, ErrorCode::io_error);
                EXPECT_EQ(opened.error().refusal, Refusal::none);
                EXPECT_EQ(opened.error().system_errno, ENOENT);
                EXPECT_NE(opened.error().message.find("No such file or directory"),
                          std::string::npos);
            }
        }
    }
}

TEST(Untrusted, ProcAndSysFilesAreRefusedEvenWhenInsideTheDirectory) {
    // An image "inside" /proc/self names environ beside it: the name stays inside the
    // directory, but the file is a kernel pseudo file.
    auto opened = detail::open_confined("/proc/self/vm.qcow2", "environ", ErrorOrigin::backing);
    ASSERT_FALSE(opened);
    EXPECT_EQ(opened.error().message, "backing file 'environ' is a /proc or /sys file (untrusted)");
    auto sys =
        detail::open_confined("/sys/kernel/vm.qcow2", "uevent_seqnum", ErrorOrigin::data_file);
    ASSERT_FALSE(sys);
    EXPECT_EQ(sys.error().message, "data file 'uevent_seqnum' is a /proc or /sys file (untrusted)");
    EXPECT_EQ(sys.error().origin, ErrorOrigin::data_file);
    EXPECT_EQ(sys.error().refusal, Refusal::untrusted);
}

TEST(Untrusted, InfoWithoutTheChainNamesTheBackingFileWithoutOpeningIt) {
    // Plain `info` does not open the backing file (only --backing-chain does), so even under
    // --untrusted it describes an image whose backing name escapes, and says so.
    qt::TempDir dir;
    overlay(dir / "top.qcow2", "/etc/hostname");
    const qt::CommandResult r = qt::run(cli() + " info --untrusted " + q(dir / "top.qcow2"));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("untrusted: backing file '/etc/hostname' would be refused: is an "
                         "absolute path\n"),
              std::string::npos)
        << r.out;
}

TEST(Untrusted, InfoShowsReferencesAndWhetherTheyPass) {
    qt::TempDir dir, outside;
    raw_file(dir / "base.raw", 1 << 20, 1);
    overlay(dir / "inside.qcow2", "base.raw");
    overlay(dir / "outside.qcow2", "../x.raw");
    const fs::path data_image = dir / "data.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -o data_file=" + q(outside / "d.raw") + " " +
               q(data_image) + " 1M");

    const std::string inside = qt::run_ok(cli() + " info --json " + q(dir / "inside.qcow2"));
    EXPECT_NE(inside.find("\"references\": [\n        { \"kind\": \"backing-file\", \"name\": "
                          "\"base.raw\", \"untrusted-allowed\": true, \"untrusted-refusal\": "
                          "null, \"missing\": false }\n    ]"),
              std::string::npos)
        << inside;
    const std::string out = qt::run_ok(cli() + " info --json " + q(dir / "outside.qcow2"));
    EXPECT_NE(out.find("{ \"kind\": \"backing-file\", \"name\": \"../x.raw\", "
                       "\"untrusted-allowed\": false, \"untrusted-refusal\": \"leaves the "
                       "image's directory\", \"missing\": false }"),
              std::string::npos)
        << out;
    const std::string data = qt::run_ok(cli() + " info --json " + q(data_image));
    EXPECT_NE(data.find("{ \"kind\": \"data-file\", \"name\": " + std::string("\"") +
                        (outside / "d.raw").string() +
                        "\", \"untrusted-allowed\": false, \"untrusted-refusal\": \"is an "
                        "absolute path\", \"missing\": false }"),
              std::string::npos)
        << data;
    const std::string human = qt::run_ok(cli() + " info " + q(dir / "outside.qcow2"));
    // As qemu-img info: the name, and where it resolves.
    EXPECT_NE(human.find("backing file: ../x.raw (actual path: " +
                         (dir.path() / "../x.raw").string() + ")\n"),
              std::string::npos)
        << human;
    EXPECT_NE(human.find("untrusted: backing file '../x.raw' would be refused: leaves the "
                         "image's directory\n"),
              std::string::npos)
        << human;
    // Issue 25: a name that would be followed needs no line (JSON lists every reference).
    const std::string fine = qt::run_ok(cli() + " info " + q(dir / "inside.qcow2"));
    EXPECT_EQ(fine.find("untrusted:"), std::string::npos) << fine;

    OpenOptions header_only;
    header_only.backing = BackingMode::none;
    auto image = Image::open(dir / "outside.qcow2", header_only);
    ASSERT_TRUE(image) << image.error().message;
    auto refs = image_references(*image);
    ASSERT_EQ(refs.size(), 1u);
    EXPECT_EQ(refs[0].kind, ImageReference::Kind::backing_file);
    EXPECT_EQ(refs[0].name, "../x.raw");
    EXPECT_EQ(refs[0].untrusted_refusal, "leaves the image's directory");
}

} // namespace
} // namespace qcowmap

// ---------------------------------------------------------------------------------------------
// Resource bounds for untrusted input (README, "Resource limits"): the largest tables qemu
// accepts are accepted and cost memory bounded by what the file really holds; one past them is
// refused with one line. (The backing chain depth is tested in test_layers BrokenChain.DepthLimit,
// check's visit budget in test_check CheckLimits.SharedL2TableDoesNotSpin, tables claimed
// beyond the file under a memory limit in test_corrupt CorruptCli.HugeTablesFailUnderAMemoryLimit.)

namespace qcowmap {
namespace {

// AddressSanitizer's shadow memory makes peak RSS meaningless.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

struct Measured {
    int exit_code = -1;
    std::uint64_t peak_kib = 0;
    std::string err;
};

/// Runs `qcowmap ARGS` with stdout discarded under /usr/bin/time: exit status and peak RSS. A
/// hang is bounded by `timeout` (exit 124), not by a wall-clock assertion: speed is bench/'s.
Measured measure(const std::string& args) {
    qt::TempDir dir;
    const fs::path times = dir / "time";
    const qt::CommandResult r = qt::run("timeout 300 /usr/bin/time -o " + q(times) + " -f '%M' " +
                                        cli() + " " + args + " >/dev/null");
    Measured m;
    m.exit_code = r.exit_code;
    m.err = r.err;
    std::ifstream in(times);
    in >> m.peak_kib;
    return m;
}

TEST(ResourceBounds, SnapshotTableAtQemusLimits) {
    // 65536 snapshots (QCOW_MAX_SNAPSHOTS), all-zero 40-byte v2 entries: accepted and listed;
    // the vector of snapshots is the only thing that grows with them.
    qt::TempDir dir;
    const fs::path img = dir / "t.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -o compat=0.10 " + q(img) + " 64M");
    qt::poke_be(img, 64, 1 << 20, 8);
    qt::poke_be(img, 60, 65536, 4);
    fs::resize_file(img, (1 << 20) + 40 * 65536);
    const Measured m = measure("info --json " + q(img));
    EXPECT_EQ(m.exit_code, 0) << m.err; // 124: timed out
    if (!kSanitized) {
        EXPECT_LT(m.peak_kib, 96u * 1024) << "65536 snapshots in under 96 MiB";
    }
    auto image = Image::open(img);
    ASSERT_TRUE(image) << image.error().message;
    EXPECT_EQ(image->info().snapshots.size(), 65536u);
    // One more is refused before anything is read.
    qt::poke_be(img, 60, 65537, 4);
    const qt::CommandResult r = qt::run(cli() + " info " + q(img));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err, "qcowmap: " + img.string() +
                         ": 65537 snapshots exceed qemu's limit of "
                         "65536\n");
}

TEST(ResourceBounds, LargestL1TableIsWalkedInPlace) {
    // A real 32 MiB L1 table (4 Mi entries, QCOW_MAX_L1_SIZE) for a 2 PiB disk, all empty: the
    // table is mapped, not copied, and the map walk visits each entry once.
    qt::TempDir dir;
    const fs::path img = dir / "t.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 " + q(img) + " 64M");
    const std::uint64_t l1 = 1 << 20;
    qt::poke_be(img, 24, (std::uint64_t{1} << 22) * (std::uint64_t{1} << 29), 8); // 2 PiB
    qt::poke_be(img, 36, std::uint64_t{1} << 22, 4);
    qt::poke_be(img, 40, l1, 8);
    fs::resize_file(img, l1 + (std::uint64_t{32} << 20));
    const Measured m = measure("map --output=json " + q(img));
    EXPECT_EQ(m.exit_code, 0) << m.err; // 124: timed out
    if (!kSanitized) {
        EXPECT_LT(m.peak_kib, 64u * 1024) << "the 32 MiB table is read in place";
    }
    // One entry more than qemu allows is refused.
    qt::poke_be(img, 36, (std::uint64_t{1} << 22) + 1, 4);
    const qt::CommandResult r = qt::run(cli() + " map " + q(img));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("exceeds qemu's limit of 0x2000000 bytes"), std::string::npos) << r.err;
}

TEST(ResourceBounds, DecompressionStopsAtOneCluster) {
    // A zstd frame that would inflate to two clusters, put in place of a one-cluster stream:
    // refused ("more than one cluster"), never decoded into more than one cluster of memory;
    // --salvage reads it as zeros.
    qt::TempDir dir;
    const fs::path big = dir / "big.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -o compression_type=zstd,cluster_size=128k " + q(big) +
               " 1M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -c -P 0x55 0 128k' " + q(big) + " >/dev/null");
    const fs::path img = dir / "t.qcow2";
    qt::run_ok("qemu-img create -q -f qcow2 -o compression_type=zstd " + q(img) + " 1M");
    qt::run_ok("qemu-io -f qcow2 -c 'write -c -P 0x55 0 64k' " + q(img) + " >/dev/null");
    auto stream = [](const fs::path& p, unsigned cluster_bits) {
        const std::uint64_t l2 = qt::peek_be(p, qt::peek_be(p, 40, 8), 8) & 0x00fffffffffffe00ULL;
        const std::uint64_t entry = qt::peek_be(p, l2, 8);
        const unsigned shift = 62 - (cluster_bits - 8);
        const std::uint64_t offset = entry & ((std::uint64_t{1} << shift) - 1);
        const std::uint64_t sectors = ((entry >> shift) & ((1u << (cluster_bits - 8)) - 1)) + 1;
        return std::pair{offset, sectors * 512 - (offset & 511)};
    };
    const auto [big_at, big_size] = stream(big, 17);
    const auto [at, size] = stream(img, 16);
    std::vector<std::byte> frame = qt::read_file(big);
    frame.erase(frame.begin(), frame.begin() + static_cast<std::ptrdiff_t>(big_at));
    frame.resize(std::min<std::uint64_t>(big_size, size));
    qt::poke(img, at, std::string(reinterpret_cast<const char*>(frame.data()), frame.size()));
    const qt::CommandResult r = qt::run(cli() + " cat " + q(img) + " >/dev/null");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("zstd frame holds more than one cluster (65536 bytes)"), std::string::npos)
        << r.err;
    const Measured salvaged = measure("cat --salvage " + q(img));
    EXPECT_EQ(salvaged.exit_code, 4) << salvaged.err;
    EXPECT_NE(salvaged.err.find("salvage: 0x0 (+0x10000) read as zeros: compressed cluster"),
              std::string::npos)
        << salvaged.err;
    if (!kSanitized) {
        EXPECT_LT(salvaged.peak_kib, 32u * 1024);
    }
}

} // namespace
} // namespace qcowmap
