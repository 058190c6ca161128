set terminal pngcairo size 900,560 font 'sans,11'
set output 'sweep-chunk.png'
set title 'streamfs streaming throughput vs chunk size (1 GiB random template)'
set xlabel 'chunk size (connections=6)'
set ylabel 'MiB/s (log scale)'
set grid
set key bottom right
set logscale y
set yrange [5:*]
set logscale x 2
set xrange [48:24576]
plot 'sweep-chunk.dat' using 1:3:xtic(2) with linespoints lw 2 pt 7 title 'loopback', '' using 1:4 with linespoints lw 2 pt 5 title '20 ms RTT', '' using 1:5 with lines dt 2 lw 1 lc rgb 'dark-green' title 'curl, loopback', '' using 1:6 with lines dt 2 lw 1 lc rgb 'dark-red' title 'curl, 20 ms RTT'
