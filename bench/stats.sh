# Sourced by the bench scripts: the statistics their tables print.
median() { # of the numbers given as arguments, to 3 decimals
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) printf "%.3f", v[(NR + 1) / 2]
              else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
range() { # "min-max" of the numbers given as arguments
    printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 }
        END { printf "%.3f-%.3f", lo, hi }'
}
