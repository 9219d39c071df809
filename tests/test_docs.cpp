// qcowmap(1) and the bash completion are written by hand: these tests hold them to `--help`, so
// that an option added to (or removed from) a command without its documentation fails here.
#include "support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <set>
#include <sstream>
#include <string>

namespace qcowmap {
namespace {

using test::cli;

using test::CommandResult;
using test::run;
using test::run_ok;
using test::shell_quote;

std::filesystem::path source_root() {
    const char* root = std::getenv("QCOWMAP_SOURCE_ROOT");
    return root ? root : ".";
}

std::string slurp(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

/// The subcommands `qcowmap --help` lists.
std::vector<std::string> commands() {
    std::string help = run_ok(cli() + " --help");
    std::vector<std::string> out;
    auto at = help.find("Subcommands:\n");
    EXPECT_NE(at, std::string::npos) << help;
    std::istringstream lines(help.substr(at + 13));
    std::string line;
    std::regex re("^  ([a-z]+) ");
    while (std::getline(lines, line)) {
        std::smatch m;
        if (std::regex_search(line, m, re))
            out.push_back(m[1]);
    }
    return out;
}

/// The options `qcowmap COMMAND --help` lists ("-f", "--format", ...).
std::set<std::string> help_options(const std::string& command) {
    std::string help = run_ok(cli() + " " + command + " --help");
    std::set<std::string> out;
    std::istringstream lines(help.substr(help.find("Options:\n")));
    std::string line;
    std::regex re("^  (-[A-Za-z](,--[a-z0-9-]+)?|--[a-z0-9-]+)( |$)");
    while (std::getline(lines, line)) {
        std::smatch m;
        if (!std::regex_search(line, m, re))
            continue;
        std::string names = m[1];
        for (std::size_t start = 0; start < names.size();) {
            std::size_t comma = names.find(',', start);
            out.insert(names.substr(start, comma - start));
            start = comma == std::string::npos ? names.size() : comma + 1;
        }
    }
    return out;
}

/// The text of the man page's `.SS COMMAND` section, with roff's escapes for dashes and fonts
/// undone so that options read as they are typed.
std::string man_section(const std::string& man, const std::string& command) {
    auto start = man.find("\n.SS " + command + "\n");
    if (start == std::string::npos)
        return {};
    auto end = man.find("\n.S", start + 1);
    std::string text = man.substr(start, end - start);
    text = std::regex_replace(text, std::regex(R"(\\f[BIRP])"), "");
    text = std::regex_replace(text, std::regex(R"(\\-)"), "-");
    return text;
}

/// The options a man section describes: each `.TP` line's options.
std::set<std::string> man_options(const std::string& section) {
    std::set<std::string> out;
    std::istringstream lines(section);
    std::string line;
    bool tag = false;
    std::regex option("(^|[ ,])(--?[A-Za-z][a-z0-9-]*)");
    while (std::getline(lines, line)) {
        if (line == ".TP") {
            tag = true;
            continue;
        }
        if (tag) {
            for (std::sregex_iterator it(line.begin(), line.end(), option), end; it != end; ++it)
                out.insert((*it)[2]);
        }
        tag = false;
    }
    return out;
}

TEST(Docs, ManPageDescribesEveryOptionOfEveryCommand) {
    const std::string man = slurp(source_root() / "apps/qcowmap.1");
    ASSERT_FALSE(man.empty());
    const std::vector<std::string> names = commands();
    ASSERT_EQ(names.size(), 14u);
    for (const std::string& command : names) {
        SCOPED_TRACE(command);
        const std::string section = man_section(man, command);
        ASSERT_FALSE(section.empty()) << "no .SS " << command << " section";
        std::set<std::string> wanted = help_options(command);
        wanted.erase("-h");
        wanted.erase("--help"); // described once, above the sections
        EXPECT_EQ(man_options(section), wanted);
        EXPECT_NE(man.find(".B qcowmap " + command + "\n"), std::string::npos)
            << "missing from SYNOPSIS";
    }
    // The page renders without warnings.
    if (run("command -v man").exit_code != 0) {
        std::cout << "man is not installed: rendering not checked" << std::endl;
        return;
    }
    CommandResult render =
        run("MANWIDTH=100 man --warnings -l " +
            shell_quote((source_root() / "apps/qcowmap.1").string()) + " 2>&1 >/dev/null");
    EXPECT_EQ(render.out, "") << "man --warnings complained";
}

TEST(Docs, BashCompletionOffersEveryCommandAndOption) {
    const std::string script = (source_root() / "apps/completion/qcowmap").string();
    // Completes COMP_WORDS as bash would and prints the candidates, one per line.
    auto complete = [&](const std::string& words) {
        std::string program = "source " + shell_quote(script) + "; COMP_WORDS=(" + words +
                              "); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _qcowmap; "
                              "printf '%s\\n' \"${COMPREPLY[@]}\" | sort";
        return run_ok("bash -c " + shell_quote(program));
    };
    std::string all;
    for (const std::string& command : commands())
        all += command + "\n";
    EXPECT_EQ(complete("qcowmap ''"),
              run_ok("printf '%s--help\\n--version\\n' " + shell_quote(all) + " | sort"));
    EXPECT_EQ(complete("qcowmap ma"), "map\n");
    for (const std::string& command : commands()) {
        SCOPED_TRACE(command);
        std::set<std::string> offered;
        std::istringstream lines(complete("qcowmap " + command + " -"));
        for (std::string line; std::getline(lines, line);)
            offered.insert(line);
        EXPECT_EQ(offered, help_options(command));
    }
    EXPECT_EQ(complete("qcowmap map --output ''"), "human\njson\n");
    EXPECT_EQ(complete("qcowmap convert --io m"), "mmap\n");
    EXPECT_EQ(complete("qcowmap hash --algo=x"), "xxh3-128\n");
    EXPECT_EQ(complete("qcowmap info -f r"), "raw\n");
    // Files after the options: the completion script itself, from its directory.
    std::string program = "cd " +
                          shell_quote(std::filesystem::path(script).parent_path().string()) +
                          "; source qcowmap; COMP_WORDS=(qcowmap info qcow); COMP_CWORD=2; "
                          "_qcowmap; printf '%s\\n' \"${COMPREPLY[@]}\"";
    EXPECT_EQ(run_ok("bash -c " + shell_quote(program)), "qcowmap\n");
}

} // namespace
} // namespace qcowmap
